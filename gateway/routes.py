"""HTTP handlers. Each decodes, calls the client, and shapes the answer; nothing else."""

from __future__ import annotations

import hmac
from typing import Any, cast

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from agentpool.broker.client import AgentPoolClient, Ticket
from agentpool.broker.streams import REPLY_TTL_S, entry_order
from agentpool.gateway import admission
from agentpool.gateway.auth import owns, require
from agentpool.gateway.http import JSON, decode, read_body, resume_after, wants_sse
from agentpool.gateway.schemas import Accepted, AskResponse, Cancelling, PendingApproval, ResumeBody
from agentpool.gateway.sse import KEEPALIVE_S, SSE_HEADERS, cancel_on_abandon, frames
from agentpool.shared import metrics
from agentpool.shared.errors import (
    BadRequest,
    Interrupted,
    NotFound,
    RequestFailed,
    StateConflict,
    Unauthorized,
    status_for_code,
)
from agentpool.shared.messages import FINAL_TYPES, End, Error, Interrupt, Timings

MAX_RESUME_BODY_BYTES = 8 * 1024


def _client(request: Request) -> AgentPoolClient:
    return request.app.state.client  # type: ignore[no-any-return]


async def ask(request: Request) -> Response:
    admitted = await admission.admit(request)  # auth, the tenant's pool, rate limit, body
    if admitted.body.n > 1:
        from agentpool.gateway import shapes

        return await shapes.fan_out(request, admitted)
    return await answer(request, admitted)


async def answer(request: Request, admitted: admission.Admitted) -> Response:
    """One admitted ask: published, then answered as JSON, SSE, or 202 for a webhook."""
    client = _client(request)
    started = await admission.start(request, admitted)  # idempotency, webhook record, publish
    ticket, sub, body = started.ticket, started.sub, admitted.body
    headers = {
        "X-Request-ID": ticket.request_id,
        "X-Thread-ID": ticket.thread_id,
        "X-Routing-Tier": ticket.tier,
        **admitted.rate_headers,
    }
    if started.replay:
        headers["Idempotent-Replayed"] = "true"
    if started.accepted:
        headers["Location"] = f"/v1/requests/{ticket.request_id}"
        return JSON(Accepted(request_id=ticket.request_id, thread_id=ticket.thread_id), 202, headers)
    return await _reply(client, ticket, sub, headers, body.stream or wants_sse(request))


async def _reply(
    client: AgentPoolClient, ticket: Ticket, sub: Any, headers: dict[str, str], stream: bool
) -> Response:
    """The reply as SSE, or its final event as one JSON body (the answer, or the pause)."""
    if stream:
        entries = client.stream_raw(ticket, sub=sub, keepalive_s=KEEPALIVE_S)
        return _sse(client, ticket, entries, headers)
    try:
        end = await client.result(ticket, sub=sub)
    except RequestFailed as e:
        e.status = status_for_code(e.error_code)
        raise
    except Interrupted as waiting:
        return JSON(paused(waiting.interrupt), headers=headers)
    return JSON(_answer(end), headers=headers)


async def resume(request: Request) -> Response:
    """A human's decision on a paused run: it continues on any replica of its pool."""
    client = _client(request)
    principal = await require(request, "ask")
    rid = request.path_params["request_id"]
    if not await owns(client, principal, rid):
        raise NotFound(f"no request {rid!r} (unknown or expired)", error_code="REQUEST_NOT_FOUND")
    body = decode(await read_body(request, MAX_RESUME_BODY_BYTES), ResumeBody)
    sub, ticket = await client.resume_subscribed(
        rid, approve=body.approve, reason=body.reason, tenant=principal.tenant
    )
    await client.redis.set(client.names.owner(ticket.request_id), principal.tenant, ex=REPLY_TTL_S)
    headers = {"X-Request-ID": ticket.request_id, "X-Thread-ID": ticket.thread_id, "X-Resumed-From": rid}
    return await _reply(client, ticket, sub, headers, body.stream or wants_sse(request))


def _answer(end: End) -> AskResponse:
    return AskResponse(**answer_fields(end))


def answer_fields(end: End) -> dict[str, Any]:
    """The fields of an answer (:class:`AskResponse`, and the fan-out's and group's kinds of it)."""
    return {
        "request_id": end.request_id,
        "thread_id": end.thread_id,
        "agent_id": end.agent_id,
        "deployment": end.deployment,
        "content": end.content,
        "usage": end.usage,
        "timings": end.timings,
        "created_at": end.created_at,
        "attempt": end.attempt,
        "steps": end.steps,
        "resumed_from": end.resumed_from,
    }


def paused(event: Interrupt) -> AskResponse:
    return AskResponse(
        request_id=event.request_id,
        thread_id=event.thread_id,
        agent_id=event.agent_id,
        deployment=event.deployment,
        content=event.content,
        usage=event.usage,
        timings=Timings(),
        created_at=event.created_at,
        attempt=event.attempt,
        status="interrupted",
        steps=event.steps,
        interrupt=PendingApproval(tool_call=event.tool_call),
        resumed_from=event.resumed_from,
    )


def _sse(
    client: AgentPoolClient, ticket: Ticket, entries: Any, headers: dict[str, str], *, caller: bool = True
) -> Response:
    """The reply stream as SSE. Only the request's own caller leaving cancels the run (``caller``):
    a reader of ``GET /v1/requests/{id}`` may be anyone of the tenant, and its going away must not
    stop an answer someone else is waiting for (``DELETE /v1/requests/{id}`` cancels on purpose)."""
    on_abandon = cancel_on_abandon(client, ticket.request_id) if caller else _stay
    return StreamingResponse(
        frames(entries, on_abandon), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
    )


def _stay() -> None:
    """A reader left: the run goes on."""


async def _owned_reply(request: Request) -> tuple[AgentPoolClient, str, str]:
    """(client, request id, reply stream key) of the caller's tenant's request, else 404."""
    client = _client(request)
    principal = await require(request, "ask")
    rid = request.path_params["request_id"]
    key = client.names.reply(rid)
    # Another tenant's request looks exactly like an unknown one.
    if not (await owns(client, principal, rid) and await client.redis.exists(key)):
        raise NotFound(f"no request {rid!r} (unknown or expired)", error_code="REQUEST_NOT_FOUND")
    return client, rid, key


async def request_resource(request: Request) -> Response:
    """``/v1/requests/{id}``: GET reads the result or the stream, DELETE cancels."""
    return await (cancel_request if request.method == "DELETE" else get_request)(request)


async def get_request(request: Request) -> Response:
    """The result of an earlier request, or its stream resumed after ``Last-Event-ID``."""
    client, rid, key = await _owned_reply(request)
    after = resume_after(request)  # validated in either mode
    last = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.redis.xrevrange(key, count=1))
    if wants_sse(request):
        if last and last[0][1][b"t"] in FINAL_TYPES and entry_order(last[0][0]) <= entry_order(after):
            # The client has the final event already (an EventSource reconnects after every
            # close): 204 is how SSE says "do not reconnect", instead of an idle stream.
            return Response(status_code=204, headers={"X-Request-ID": rid})
        if last and entry_order(after) > entry_order(last[0][0]):
            # No event of this stream has that id, nor will one: the stream's ids only grow
            # from its newest, which the client has not seen.
            raise BadRequest(
                f"Last-Event-ID {after.decode()} is past the newest event of request {rid!r}",
                error_code="VALIDATION_ERROR",
                details={"header": "Last-Event-ID", "newest": last[0][0].decode()},
            )
        ticket = Ticket(rid, "", "", "", "resume")
        entries = client.stream_raw(ticket, after=after, keepalive_s=KEEPALIVE_S)
        return _sse(client, ticket, entries, {"X-Request-ID": rid}, caller=False)
    for _id, fields in last:
        if fields[b"t"] == b"end":
            return JSON(_answer(msgspec.json.decode(fields[b"d"], type=End)))
        if fields[b"t"] == b"interrupt":
            return JSON(paused(msgspec.json.decode(fields[b"d"], type=Interrupt)))
        if fields[b"t"] == b"error":
            err = msgspec.json.decode(fields[b"d"], type=Error)
            failed = RequestFailed(err.error, error_code=err.error_code, details={"request_id": rid})
            failed.status = status_for_code(err.error_code)
            raise failed
    return JSON({"request_id": rid, "status": "running"}, status_code=202)


async def cancel_request(request: Request) -> Response:
    """``DELETE /v1/requests/{id}``: stop the run now (its stream ends with ``error CANCELLED``);
    409 when it has ended already."""
    client, rid, key = await _owned_reply(request)
    last = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.redis.xrevrange(key, count=1))
    if last and last[0][1][b"t"] in FINAL_TYPES:
        raise StateConflict(
            f"request {rid!r} has ended already", error_code="REQUEST_ENDED", details={"request_id": rid}
        )
    await client.store.cancel(rid)
    return JSON(Cancelling(request_id=rid), status_code=202)


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    deps = await _client(request).ready()
    ok = all(deps.values())
    return JSON(
        {"status": "ready" if ok else "not_ready", "dependencies": deps}, status_code=200 if ok else 503
    )


async def metrics_text(request: Request) -> Response:
    """Prometheus scrape of this gateway process; 404 when metrics are off (AGENTPOOL_METRICS=0);
    with ``AGENTPOOL_METRICS_TOKEN`` set, only for ``Authorization: Bearer <that token>``."""
    if not metrics.enabled():
        raise NotFound("metrics are disabled (AGENTPOOL_METRICS=0)")
    token = request.app.state.settings.metrics_token
    sent = request.headers.get("authorization", "").encode("latin-1")  # how Starlette decoded it
    if token and not hmac.compare_digest(sent, f"Bearer {token}".encode()):
        raise Unauthorized("/metrics needs Authorization: Bearer <AGENTPOOL_METRICS_TOKEN>")
    body, content_type = metrics.exposition()
    return Response(body, headers={"Content-Type": content_type})
