"""Small HTTP helpers: msgspec JSON responses, the error shape, bounded body reading."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from agentpool.broker.streams import is_stream_id
from agentpool.shared.errors import AgentPoolError, BadRequest, PayloadTooLarge

log = logging.getLogger("agentpool.gateway")
T = TypeVar("T")
_ENC = msgspec.json.Encoder()


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _ENC.encode(content)


def error_headers(err: AgentPoolError, extra_headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers of an error answer: ``extra_headers`` (the rate limit's, a 405's Allow) and
    ``Retry-After``."""
    headers = dict(extra_headers or {})
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return headers


def error_response(err: AgentPoolError, extra_headers: Mapping[str, str] | None = None) -> Response:
    return JSON(err.body(), status_code=err.status, headers=error_headers(err, extra_headers))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes (by header first, then while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number", details={"header": "content-length"})
        if int(declared) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes", details={"limit_bytes": limit})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes", details={"limit_bytes": limit})
        chunks.append(chunk)
    return b"".join(chunks)


def decode(body: bytes, type_: type[T]) -> T:
    """JSON -> ``type_``; every failure is a 400 naming the field and the problem."""
    if not body:
        raise BadRequest("the request body is empty; send a JSON object", error_code="INVALID_JSON")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise BadRequest(str(e), error_code="VALIDATION_ERROR", details=_where(str(e))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}", error_code="INVALID_JSON") from None


def _where(message: str) -> dict[str, str]:
    """The field a msgspec error is about, as a dotted path: ``context_variables``, ``a.b``."""
    text, sep, path = message.partition(" - at `")
    where = path.rstrip("`").removeprefix("key` in `").removeprefix("$").lstrip(".") if sep else ""
    # msgspec names a bad mapping key as "`key` in `$.context_variables`": name the mapping
    unknown = _UNKNOWN.search(text)
    if unknown:  # "Object contains unknown field `x`": the field is x, inside `where`
        where = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
    return {"field": where} if where else {}


_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def wants_sse(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def resume_after(request: Request) -> bytes:
    """``Last-Event-ID`` (or ``?after=``): a Redis stream entry id, validated; ``0-0`` if none."""
    after = request.headers.get("last-event-id", request.query_params.get("after", "0-0"))  # "" is invalid
    if not is_stream_id(after.encode()):
        raise BadRequest(
            "Last-Event-ID must be a stream entry id like 1795334370711-0",
            error_code="VALIDATION_ERROR",
            details={"header": "Last-Event-ID"},
        )
    return after.encode()


TRACEPARENT_CHARS = 55  # version 00: 00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def traceparent(request: Request) -> str | None:
    """The W3C ``traceparent``, as version 00; None when absent or invalid.

    W3C Trace Context says an invalid one is ignored, not refused, so it is dropped: nothing longer
    than 55 characters is queued or stored. A later version's extra fields are dropped likewise."""
    raw = request.headers.get("traceparent")
    if raw is None or len(raw) < TRACEPARENT_CHARS:
        return None
    m = _TRACEPARENT.fullmatch(raw, 0, TRACEPARENT_CHARS)
    if m is None or m[2] == "0" * 32 or m[3] == "0" * 16 or m[1] == "ff":
        return None
    if len(raw) > TRACEPARENT_CHARS and (m[1] == "00" or raw[TRACEPARENT_CHARS] != "-"):
        return None
    flags = m[4] if m[1] == "00" else f"{int(m[4], 16) & 1:02x}"  # of a later version: only "sampled"
    return f"00-{m[2]}-{m[3]}-{flags}"


async def on_client_gone(request: Request, exc: Exception) -> Response:
    """The client left before its body was read whole: nothing of it was queued, so nothing is lost.
    The answer goes nowhere; it only ends the handler without an ERROR traceback."""
    log.debug("client disconnected before its body was read", extra={"path": request.url.path})
    return Response(status_code=499)
