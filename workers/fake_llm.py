"""A fake LLM server speaking the OpenAI and Anthropic HTTP APIs, for tests and load tests.

Run it::

    agentpool fake-llm --port 9100 [--host 127.0.0.1] [--ttft-ms 300] [--tokens-per-s 40]
                       [--reply-tokens 24] [--api-key sk-fake]
    python -m workers.fake_llm --port 9100 ...

Defaults come from ``FAKE_LLM_TTFT_MS``, ``FAKE_LLM_TOKENS_PER_S``, ``FAKE_LLM_REPLY_TOKENS`` and
``FAKE_LLM_API_KEY``. Point providers at it (the OpenAI SDK wants ``/v1`` in its base URL, the
Anthropic SDK adds it itself)::

    [providers.openai-fake]
    kind = "openai"
    base_url = "http://127.0.0.1:9100/v1"
    api_key_env = "FAKE_LLM_API_KEY"

    [providers.anthropic-fake]
    kind = "anthropic"
    base_url = "http://127.0.0.1:9100"
    api_key_env = "FAKE_LLM_API_KEY"

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/messages`` (plain JSON, or SSE with
``"stream": true``), ``GET /v1/models``. The reply is ``fake_tokens(system, messages, n)`` from
:mod:`workers.providers.fake` with ``n = min(max_tokens, reply_tokens)``; it starts with
``[k earlier]``, k being the number of messages before the last one, so a test sees history arrive.

With ``--api-key``, OpenAI calls need ``Authorization: Bearer KEY`` and Anthropic calls
``x-api-key: KEY`` or ``Authorization: Bearer KEY`` (what the Anthropic SDK 2.x sends); anything
else gets a 401 in that API's error shape.

Per-request headers override the timing knobs: ``x-fake-ttft-ms``, ``x-fake-tokens-per-s``,
``x-fake-reply-tokens``. Faults come from the header ``x-fake-fault`` or from a script that the
model calls consume one each, first in first out, across both APIs (a call carrying the header
uses it and leaves the script alone)::

    curl -X POST localhost:9100/_fake/faults -d '{"faults": ["429", "500", "ok"], "retry_after_s": 0.1}'
    curl localhost:9100/_fake/stats    # requests per API, connections used, last bodies, ...
    curl -X POST localhost:9100/_fake/reset

Faults: ``429`` (with ``retry-after``), ``500``, ``timeout`` (no answer until the client gives
up), ``drop`` (a few tokens, then the connection is cut before the terminal events), ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from workers.providers.base import Message
from workers.providers.fake import count_tokens, fake_tokens

FAULTS = ("ok", "429", "500", "timeout", "drop")
BODIES_KEPT = 50  # last request bodies kept per API for /_fake/stats
DROP_LOG = "ASGI callable returned without completing response."  # uvicorn's words for a drop
MODELS = ("fake-1",)


@dataclass
class FakeLLMSettings:
    """Start-time knobs; ``hang_s`` bounds the ``timeout`` fault if the client never gives up."""

    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0 = as fast as possible
    reply_tokens: int = 24
    api_key: str | None = None
    retry_after_s: float = 1.0
    drop_after_tokens: int = 3
    hang_s: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FakeLLMSettings:
        """Defaults from ``FAKE_LLM_*`` variables; a bad number fails at start."""
        return cls(
            ttft_ms=float(environ.get("FAKE_LLM_TTFT_MS", 0)),
            tokens_per_s=float(environ.get("FAKE_LLM_TOKENS_PER_S", 0)),
            reply_tokens=int(environ.get("FAKE_LLM_REPLY_TOKENS", 24)),
            api_key=environ.get("FAKE_LLM_API_KEY") or None,
        )


class _Reject(Exception):
    """A request the fake refuses; rendered in the calling API's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FakeLLM:
    """The server's state: settings, the fault script, and what it was asked."""

    def __init__(self, settings: FakeLLMSettings) -> None:
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        self.faults: deque[str] = deque()
        self.retry_after_s = self.settings.retry_after_s
        self.requests = {"openai": 0, "anthropic": 0}
        self.models_requests = 0
        self.peers: set[tuple[str, int]] = set()  # client addresses: how many connections were used
        self.bodies: dict[str, deque[Any]] = {api: deque(maxlen=BODIES_KEPT) for api in self.requests}

    def script(self, faults: Sequence[str], retry_after_s: float | None) -> None:
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise _Reject(400, f"unknown faults {bad}; known: {list(FAULTS)}")
        self.faults.extend(faults)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def seen(self, request: Request) -> None:
        if request.client is not None:
            self.peers.add((request.client.host, request.client.port))

    def record(self, api: str, body: Any) -> None:
        self.requests[api] += 1
        self.bodies[api].append(body)

    def take_fault(self, request: Request) -> str:
        """The header's fault if any (the script stays put), else the next scripted one."""
        fault = request.headers.get("x-fake-fault")
        if fault is None:
            return self.faults.popleft() if self.faults else "ok"
        if fault not in FAULTS:
            raise _Reject(400, f"x-fake-fault: unknown fault {fault!r}; known: {list(FAULTS)}")
        return fault

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "models_requests": self.models_requests,
            "connections": len(self.peers),
            "faults_pending": list(self.faults),
            "bodies": {api: list(b) for api, b in self.bodies.items()},
        }


@dataclass
class Call:
    """A model call, as read from either API's request body."""

    model: str
    system: str
    messages: list[Message]
    max_tokens: int | None
    stream: bool
    include_usage: bool = False


@dataclass
class Reply:
    """What the fake answers to a call, and how fast."""

    id: str
    model: str
    tokens: list[str]
    input_tokens: int
    truncated: bool  # max_tokens cut the reply short
    ttft_s: float
    gap_s: float
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def _knob(request: Request, name: str, default: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _Reject(400, f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise _Reject(400, f"{name}: must be >= 0")
    return value


def plan_reply(settings: FakeLLMSettings, request: Request, call: Call, id_prefix: str) -> Reply:
    """The deterministic reply to ``call``, with timing from the settings or request headers."""
    reply_tokens = int(_knob(request, "x-fake-reply-tokens", settings.reply_tokens)) or 1
    n = min(call.max_tokens or reply_tokens, reply_tokens)
    tokens_per_s = _knob(request, "x-fake-tokens-per-s", settings.tokens_per_s)
    return Reply(
        id=f"{id_prefix}{uuid.uuid4().hex[:24]}",
        model=call.model,
        tokens=fake_tokens(call.system, call.messages, n),
        input_tokens=count_tokens(call.system) + sum(count_tokens(m.content) for m in call.messages),
        truncated=n < reply_tokens,
        ttft_s=_knob(request, "x-fake-ttft-ms", settings.ttft_ms) / 1000,
        gap_s=1.0 / tokens_per_s if tokens_per_s else 0.0,
    )


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or a list of blocks of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise _Reject(400, "content: expected a string or a list of content blocks")


def _messages_of(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise _Reject(400, "messages: expected a non-empty list")
    out = []
    for m in raw:
        if not isinstance(m, dict):
            raise _Reject(400, "messages: expected objects")
        if m.get("role") in ("user", "assistant"):
            out.append(Message(m["role"], _text_of(m.get("content", ""))))
    return out


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + msgspec.json.encode(data) + b"\n\n"


class Api:
    """One wire format: how to read a call and write replies and errors."""

    name = ""
    id_prefix = ""
    error_types: dict[int, str] = {}

    def authorized(self, request: Request, api_key: str) -> bool:
        return request.headers.get("authorization") == f"Bearer {api_key}"

    def parse(self, request: Request, body: Any) -> Call:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
        body = msgspec.json.encode(self.error_body(status, message))
        return Response(body, status, headers=headers, media_type="application/json")

    def complete(self, call: Call, reply: Reply) -> dict[str, Any]:
        raise NotImplementedError

    def sse_head(self, call: Call, reply: Reply) -> bytes:
        raise NotImplementedError

    def sse_delta(self, call: Call, reply: Reply, text: str) -> bytes:
        raise NotImplementedError

    def sse_tail(self, call: Call, reply: Reply) -> bytes:
        raise NotImplementedError

    def models(self) -> dict[str, Any]:
        raise NotImplementedError


class OpenAIApi(Api):
    name = "openai"
    id_prefix = "chatcmpl-fake"
    error_types = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        429: "requests",
        500: "server_error",
        504: "timeout",
    }

    def parse(self, request: Request, body: Any) -> Call:
        raw = body.get("messages")
        systems = [m for m in raw or () if isinstance(m, dict) and m.get("role") in ("system", "developer")]
        options = body.get("stream_options") or {}
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and not isinstance(max_tokens, int):
            raise _Reject(400, "max_completion_tokens: expected an integer")
        return Call(
            model=str(body.get("model", "")),
            system="\n".join(_text_of(m.get("content", "")) for m in systems),
            messages=_messages_of(raw),
            max_tokens=max_tokens,
            stream=bool(body.get("stream")),
            include_usage=bool(options.get("include_usage")),
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        kind = self.error_types.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def _usage(self, reply: Reply) -> dict[str, int]:
        out = len(reply.tokens)
        return {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": out,
            "total_tokens": reply.input_tokens + out,
        }

    def _finish(self, reply: Reply) -> str:
        return "length" if reply.truncated else "stop"

    def complete(self, call: Call, reply: Reply) -> dict[str, Any]:
        message = {"role": "assistant", "content": reply.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish(reply)}
        return {
            "id": reply.id,
            "object": "chat.completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [choice],
            "usage": self._usage(reply),
        }

    def _chunk(self, call: Call, reply: Reply, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": reply.id,
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if call.include_usage:
            chunk["usage"] = None
        return _sse(chunk | extra)

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def sse_head(self, call: Call, reply: Reply) -> bytes:
        return self._chunk(call, reply, [self._choice({"role": "assistant", "content": ""})])

    def sse_delta(self, call: Call, reply: Reply, text: str) -> bytes:
        return self._chunk(call, reply, [self._choice({"content": text})])

    def sse_tail(self, call: Call, reply: Reply) -> bytes:
        out = self._chunk(call, reply, [self._choice({}, self._finish(reply))])
        if call.include_usage:
            out += self._chunk(call, reply, [], usage=self._usage(reply))
        return out + b"data: [DONE]\n\n"

    def models(self) -> dict[str, Any]:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "agentpool"} for m in MODELS]
        return {"object": "list", "data": data}


class AnthropicApi(Api):
    name = "anthropic"
    id_prefix = "msg_fake"
    error_types = {
        400: "invalid_request_error",
        401: "authentication_error",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
    }
    NO_SAMPLING_SINCE = "2026-10-21"  # the API version that refuses temperature/top_p/top_k

    def authorized(self, request: Request, api_key: str) -> bool:
        return request.headers.get("x-api-key") == api_key or super().authorized(request, api_key)

    def parse(self, request: Request, body: Any) -> Call:
        version = request.headers.get("anthropic-version", "")
        sampling = [k for k in ("temperature", "top_p", "top_k") if k in body]
        if sampling and version >= self.NO_SAMPLING_SINCE:
            raise _Reject(400, f"{sampling[0]}: Extra inputs are not permitted")
        if not isinstance(body.get("max_tokens"), int):
            raise _Reject(400, "max_tokens: Field required")
        return Call(
            model=str(body.get("model", "")),
            system=_text_of(body.get("system", "")),
            messages=_messages_of(body.get("messages")),
            max_tokens=body["max_tokens"],
            stream=bool(body.get("stream")),
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = self.error_types.get(status, "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def _message(self, reply: Reply, content: list[Any], stop: str | None, out: int) -> dict[str, Any]:
        return {
            "id": reply.id,
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": out},
        }

    def _stop(self, reply: Reply) -> str:
        return "max_tokens" if reply.truncated else "end_turn"

    def complete(self, call: Call, reply: Reply) -> dict[str, Any]:
        content = [{"type": "text", "text": reply.text}]
        return self._message(reply, content, self._stop(reply), len(reply.tokens))

    def sse_head(self, call: Call, reply: Reply) -> bytes:
        start = {"type": "message_start", "message": self._message(reply, [], None, 1)}
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return (
            _sse(start, "message_start") + _sse(block, "content_block_start") + _sse({"type": "ping"}, "ping")
        )

    def sse_delta(self, call: Call, reply: Reply, text: str) -> bytes:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        return _sse(delta, "content_block_delta")

    def sse_tail(self, call: Call, reply: Reply) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop(reply), "stop_sequence": None},
            "usage": {"output_tokens": len(reply.tokens)},
        }
        return (
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + _sse(delta, "message_delta")
            + _sse({"type": "message_stop"}, "message_stop")
        )

    def models(self) -> dict[str, Any]:
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in MODELS
        ]
        return {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}


OPENAI, ANTHROPIC = OpenAIApi(), AnthropicApi()


class _Pieces:
    """An ASGI response from body pieces; a ``None`` piece cuts the connection mid-body (a drop)."""

    def __init__(self, pieces: AsyncGenerator[bytes | None, None], headers: Mapping[str, str]) -> None:
        self.pieces = pieces
        self.headers = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        gone = asyncio.create_task(_until_disconnected(receive))
        try:
            async with contextlib.aclosing(self.pieces) as pieces:
                async for piece in pieces:
                    if piece is None or gone.done():
                        return  # the server closes the connection: the body never completes
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(
    api: Api, call: Call, reply: Reply, drop_after: int | None
) -> AsyncGenerator[bytes | None, None]:
    """The SSE body: head, one delta per token at the configured pace, tail (or a cut)."""
    yield api.sse_head(call, reply)
    await asyncio.sleep(reply.ttft_s)
    for i, token in enumerate(reply.tokens):
        if i == drop_after:
            yield None
            return
        if i and reply.gap_s:
            await asyncio.sleep(reply.gap_s)
        yield api.sse_delta(call, reply, token)
    yield api.sse_tail(call, reply)


async def _whole(body: bytes, delay_s: float, drop: bool) -> AsyncGenerator[bytes | None, None]:
    await asyncio.sleep(delay_s)
    yield body[: len(body) // 2] if drop else body
    if drop:
        yield None


def _respond(api: Api, call: Call, reply: Reply, fault: str, settings: FakeLLMSettings) -> Response | _Pieces:
    drop = fault == "drop"
    if call.stream:
        drop_after = min(settings.drop_after_tokens, len(reply.tokens) - 1) if drop else None
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        return _Pieces(_stream(api, call, reply, drop_after), headers)
    body = msgspec.json.encode(api.complete(call, reply))
    delay_s = reply.ttft_s + reply.gap_s * max(0, len(reply.tokens) - 1)
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    return _Pieces(_whole(body, delay_s, drop), headers)


async def _hang(request: Request, api: Api, hang_s: float) -> Response:
    """The ``timeout`` fault: no answer until the client hangs up (or ``hang_s`` passes)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(hang_s):
            await _until_disconnected(request.receive)
    return api.error(504, "fake timeout: the model did not answer in time")


async def _json(request: Request) -> Any:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as e:
        raise _Reject(400, f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _Reject(400, "expected a JSON object")
    return body


def _check_auth(request: Request, api: Api, api_key: str | None) -> None:
    if api_key is not None and not api.authorized(request, api_key):
        raise _Reject(401, "invalid api key")


async def _model_call(request: Request, api: Api) -> Response | _Pieces:
    """One chat call in ``api``'s format: record, authenticate, apply the fault, answer."""
    fake: FakeLLM = request.app.state.fake
    fake.seen(request)
    try:
        body = await _json(request)
        fake.record(api.name, body)
        _check_auth(request, api, fake.settings.api_key)
        call = api.parse(request, body)
        reply = plan_reply(fake.settings, request, call, api.id_prefix)
        fault = fake.take_fault(request)
    except _Reject as e:
        return api.error(e.status, e.message)
    if fault == "429":
        retry = f"{fake.retry_after_s:g}"
        return api.error(429, "fake rate limit", {"retry-after": retry})
    if fault == "500":
        return api.error(500, "fake internal error")
    if fault == "timeout":
        return await _hang(request, api, fake.settings.hang_s)
    return _respond(api, call, reply, fault, fake.settings)


async def openai_chat(request: Request) -> Response | _Pieces:
    return await _model_call(request, OPENAI)


async def anthropic_messages(request: Request) -> Response | _Pieces:
    return await _model_call(request, ANTHROPIC)


async def list_models(request: Request) -> Response:
    """``GET /v1/models`` in the format of whichever SDK asks (Anthropic's sends its version)."""
    fake: FakeLLM = request.app.state.fake
    fake.models_requests += 1
    fake.seen(request)
    api = ANTHROPIC if "anthropic-version" in request.headers else OPENAI
    try:
        _check_auth(request, api, fake.settings.api_key)
    except _Reject as e:
        return api.error(e.status, e.message)
    return Response(msgspec.json.encode(api.models()), media_type="application/json")


async def post_faults(request: Request) -> Response:
    fake: FakeLLM = request.app.state.fake
    try:
        body = await _json(request)
        faults, retry_after_s = body.get("faults", []), body.get("retry_after_s")
        if not isinstance(faults, list) or not isinstance(retry_after_s, int | float | None):
            raise _Reject(400, 'expected {"faults": [...], "retry_after_s": seconds}')
        fake.script([str(f) for f in faults], retry_after_s)
    except _Reject as e:
        return Response(msgspec.json.encode({"error": e.message}), e.status, media_type="application/json")
    return _ok({"faults_pending": list(fake.faults)})


async def get_stats(request: Request) -> Response:
    return _ok(request.app.state.fake.stats())


async def post_reset(request: Request) -> Response:
    request.app.state.fake.reset()
    return _ok({"reset": True})


def _ok(data: Any) -> Response:
    return Response(msgspec.json.encode(data), media_type="application/json")


def build_app(fake: FakeLLM | None = None) -> Starlette:
    """The ASGI app; ``app.state.fake`` is its :class:`FakeLLM` (settings, fault script, stats)."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", openai_chat, methods=["POST"]),
            Route("/v1/messages", anthropic_messages, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/_fake/faults", post_faults, methods=["POST"]),
            Route("/_fake/stats", get_stats, methods=["GET"]),
            Route("/_fake/reset", post_reset, methods=["POST"]),
        ]
    )
    app.state.fake = fake or FakeLLM(FakeLLMSettings())
    return app


class _DropFilter(logging.Filter):
    """Drops uvicorn's error line for a cut connection: for this server that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != DROP_LOG


def _quiet_drops() -> None:
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropFilter) for f in log.filters):
        log.addFilter(_DropFilter())


def _uvicorn_config(app: Starlette, host: str, port: int, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        ws="none",
        access_log=False,
        timeout_graceful_shutdown=5,
        **kw,
    )


async def run(settings: FakeLLMSettings, host: str = "127.0.0.1", port: int = 9100) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles the signals)."""
    _quiet_drops()
    await uvicorn.Server(_uvicorn_config(build_app(FakeLLM(settings)), host, port)).serve()


def serve(host: str = "127.0.0.1", port: int = 9100, settings: FakeLLMSettings | None = None) -> None:
    """Blocking entry point: serve on ``host:port`` with uvicorn's event loop (uvloop if installed)."""
    _quiet_drops()
    app = build_app(FakeLLM(settings or FakeLLMSettings.from_env()))
    uvicorn.Server(_uvicorn_config(app, host, port)).run()


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server for in-process use: tells when it is listening, leaves signals alone."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Running:
    """A fake LLM serving in this event loop."""

    fake: FakeLLM
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running(
    settings: FakeLLMSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Running]:
    """Serve in the current event loop for the duration of the block; ``port=0`` picks a free one."""
    _quiet_drops()
    fake = FakeLLM(settings or FakeLLMSettings())
    sock = _bind(host, port)  # bound here so a taken port raises OSError instead of exiting
    server = _EmbeddedServer(_uvicorn_config(build_app(fake), host, port, log_config=None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if task.done():
            task.result()
            raise RuntimeError("the fake LLM server stopped during start-up")
        yield Running(fake, host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


def _parser() -> argparse.ArgumentParser:
    env = FakeLLMSettings.from_env()
    p = argparse.ArgumentParser(
        prog="agentpool fake-llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--ttft-ms", type=float, default=env.ttft_ms, help="delay before the first token")
    p.add_argument("--tokens-per-s", type=float, default=env.tokens_per_s, help="0 = as fast as possible")
    p.add_argument("--reply-tokens", type=int, default=env.reply_tokens, help="tokens per reply")
    p.add_argument("--api-key", default=env.api_key, help="require this key (default: accept any)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``agentpool fake-llm``: parse the flags and serve until interrupted."""
    try:
        args = _parser().parse_args(argv)
    except ValueError as e:  # a bad FAKE_LLM_* number
        print(f"fake-llm: {e}", file=sys.stderr)
        return 2
    settings = FakeLLMSettings(
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        reply_tokens=args.reply_tokens,
        api_key=args.api_key or None,
    )
    serve(args.host, args.port, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
