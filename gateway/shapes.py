"""HTTP for the pool shapes: best-of-N fan-out (``n`` on an ask), group asks with escalation,
a group's status, and the direct endpoint to one agent (broker/shapes.py does the work).

Fan-out and group streams tag every event with its ``run`` or ``level`` (a field added to the
event's JSON). A fan-out stream ends with ``event: done`` (which runs answered, failed, were
cancelled); its frames carry no ``id:``, since N streams have no one position to resume from:
resume one run by its request id (``GET /v1/requests/{id}``, the id in its ``start`` event).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from agentpool.broker import shapes
from agentpool.broker.client import KEEPALIVE, AgentPoolClient
from agentpool.broker.redis_conn import translated
from agentpool.broker.streams import REPLY_TTL_S
from agentpool.gateway import admission, routes
from agentpool.gateway.admin import fleet_wide
from agentpool.gateway.admission import Admitted
from agentpool.gateway.auth import require
from agentpool.gateway.http import JSON, traceparent, wants_sse
from agentpool.gateway.schemas import (
    FanOutResponse,
    GroupAnswer,
    RunAnswer,
    RunCancelled,
)
from agentpool.gateway.sse import KEEPALIVE_S, SSE_HEADERS, cancel_soon, frame
from agentpool.shared import metrics
from agentpool.shared.errors import BadRequest, NotFound, RequestFailed, status_for_code
from agentpool.shared.messages import EVENT_ENCODER, FINAL_TYPES, End, Error, Interrupt


def _client(request: Request) -> AgentPoolClient:
    return request.app.state.client  # type: ignore[no-any-return]


def _tag(name: bytes, value: bytes, data: bytes) -> bytes:
    """``data`` (a JSON object) with ``"name": value`` first."""
    return b'{"' + name + b'":' + value + (b"," + data[1:] if data != b"{}" else b"}")


def _run_kwargs(request: Request, a: Admitted) -> dict[str, Any]:
    return {
        "tenant": a.principal.tenant,
        "max_wait_s": a.body.wait_s(),
        "context_variables": a.body.context_variables,
        "traceparent": traceparent(request),
        "warm_only": a.body.warm_only,
    }


# --- fan-out


async def fan_out(request: Request, a: Admitted) -> Response:
    """``n > 1``: the runs' answers as one JSON body, or their events interleaved as SSE."""
    client = _client(request)
    body = a.body
    with translated(client.settings.redis_url):
        runs = await shapes.start_runs(
            client,
            a.pool_name,
            body.content,
            body.n,
            thread_id=body.thread_id,
            seed=body.seed,
            **_run_kwargs(request, a),
        )
        try:  # the runs are the caller's tenant's (GET /v1/requests/{id} of each)
            pipe = client.redis.pipeline(transaction=False)
            for r in runs:
                pipe.set(client.names.owner(r.ticket.request_id), a.principal.tenant, ex=REPLY_TTL_S)
            await pipe.execute()
        except BaseException:
            await shapes.withdraw(client, runs)
            raise
    headers = {
        "X-Thread-ID": runs[0].ticket.thread_id,
        "X-Request-IDs": ",".join(r.ticket.request_id for r in runs),
        **a.rate_headers,
    }
    stream = body.stream or wants_sse(request)
    merged = shapes.Merged(
        client,
        runs,
        select=body.select,
        timeout_s=body.timeout_s,
        keepalive_s=KEEPALIVE_S if stream else None,
    )
    if stream:
        return StreamingResponse(
            _fan_frames(client, merged), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    out = FanOutResponse(thread_id=runs[0].ticket.thread_id, results=[], failed=[])
    ended: set[int] = set()
    try:
        async with contextlib.aclosing(merged.entries()) as entries:
            async for index, (_id, kind, data) in entries:
                if kind in FINAL_TYPES:
                    ended.add(index)
                if kind == b"end":
                    out.results.append(_run_answer(index, msgspec.json.decode(data, type=End)))
                elif kind == b"error":
                    out.failed.append(shapes.RunFailure.of(index, data))
    finally:  # the caller went away mid-way: stop what still runs
        if len(ended) < len(runs) and not (merged.cancelled or merged.expired):
            cancel_soon(client, [r.ticket.request_id for r in runs if r.index not in ended])
    _summarize(out, merged)
    return JSON(out, headers=headers)


def _summarize(out: FanOutResponse, merged: shapes.Merged) -> None:
    out.cancelled = [RunCancelled(run=r.index, request_id=r.ticket.request_id) for r in merged.cancelled]
    out.failed = sorted([*out.failed, *merged.expired_failures()], key=lambda f: f.run)


def _run_answer(index: int, end: End) -> RunAnswer:
    return RunAnswer(**routes.answer_fields(end), run=index)


async def _fan_frames(client: AgentPoolClient, merged: shapes.Merged) -> AsyncIterator[bytes]:
    ended: set[int] = set()
    out = FanOutResponse(thread_id=merged.runs[0].ticket.thread_id, results=[], failed=[])
    metrics.sse_streams(1)
    done = False
    try:
        async with contextlib.aclosing(merged.entries()) as entries:
            async for index, entry in entries:
                if entry is KEEPALIVE:
                    yield b": keep-alive\n\n"
                    continue
                _id, kind, data = entry
                yield frame(b"", kind, _tag(b"run", str(index).encode(), data))
                if kind in FINAL_TYPES:
                    ended.add(index)
                if kind == b"error":
                    out.failed.append(shapes.RunFailure.of(index, data))
        _summarize(out, merged)
        summary = {
            "thread_id": out.thread_id,
            "completed": sorted(ended - {f.run for f in out.failed}),
            "failed": out.failed,
            "cancelled": out.cancelled,
        }
        yield frame(b"", b"done", EVENT_ENCODER.encode(summary))
        done = True
    finally:
        metrics.sse_streams(-1)
        if not done:
            cancel_soon(client, [r.ticket.request_id for r in merged.runs if r.index not in ended])


# --- groups


async def group_ask(request: Request) -> Response:
    """``POST /v1/groups/{group}/ask``: the level's pool answers; ``escalate`` goes one level up
    when a run fails or its level's validator rejects the answer."""
    client = _client(request)
    a, body, chain = await admission.admit_group(request)
    group = request.path_params["group"]
    if body.n > 1:
        return await fan_out(request, a)
    if not body.escalate:  # an ask of the level's pool, as POST /v1/ask/{pool} answers it
        return await routes.answer(request, a)
    chain = [(lv, p) for lv, p in chain if _visible(client, p, a.principal.tenant)]
    stream = body.stream or wants_sse(request)
    esc = shapes.Escalation(
        client,
        chain,
        body.content,
        keepalive_s=KEEPALIVE_S if stream else None,
        thread_id=body.thread_id,
        **_run_kwargs(request, a),
    )
    with translated(client.settings.redis_url):
        ticket = await esc.start()
        await client.redis.set(client.names.owner(ticket.request_id), a.principal.tenant, ex=REPLY_TTL_S)
    headers = {"X-Thread-ID": esc.thread_id, **a.rate_headers}
    if stream:
        return StreamingResponse(
            _group_frames(client, esc, a.principal.tenant),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )
    async with contextlib.aclosing(_owned(client, esc, a.principal.tenant)) as entries:
        async for level, (_id, kind, data) in entries:
            if kind == b"end":
                end = msgspec.json.decode(data, type=End)
                return JSON(_group_answer(group, level, end, esc.levels), headers=headers)
            if kind == b"interrupt":  # the level's run waits for approval: resume it by its id
                return JSON(routes.paused(msgspec.json.decode(data, type=Interrupt)), headers=headers)
            if kind == b"error":
                err = msgspec.json.decode(data, type=Error)
                failed = RequestFailed(
                    err.error,
                    error_code=err.error_code,
                    details={"request_id": err.request_id, "levels": esc.levels},
                )
                failed.status = status_for_code(err.error_code)
                raise failed
    raise RequestFailed("the group ask ended without an answer", error_code="INTERNAL")


async def _owned(
    client: AgentPoolClient, esc: shapes.Escalation, tenant: str
) -> AsyncGenerator[tuple[str, shapes.Entry], None]:
    """The escalation's entries; each level's request is recorded as the tenant's as it starts."""
    seen = esc.current.request_id if esc.current else ""
    async with contextlib.aclosing(esc.entries()) as entries:
        async for level, entry in entries:
            if esc.current is not None and esc.current.request_id != seen:
                seen = esc.current.request_id
                await client.redis.set(client.names.owner(seen), tenant, ex=REPLY_TTL_S)
            yield level, entry


async def _group_frames(client: AgentPoolClient, esc: shapes.Escalation, tenant: str) -> AsyncIterator[bytes]:
    metrics.sse_streams(1)
    finished = False
    try:
        async with contextlib.aclosing(_owned(client, esc, tenant)) as entries:
            async for level, entry in entries:
                if entry is KEEPALIVE:
                    yield b": keep-alive\n\n"
                    continue
                entry_id, kind, data = entry
                tagged = _tag(b"level", EVENT_ENCODER.encode(level), data)
                if kind == b"end":
                    tagged = _tag(b"levels", EVENT_ENCODER.encode(esc.levels), tagged)
                yield frame(entry_id, kind, tagged)
                finished = kind in FINAL_TYPES
    finally:
        metrics.sse_streams(-1)
        if not finished and esc.current is not None:
            cancel_soon(client, [esc.current.request_id])


def _group_answer(group: str, level: str, end: End, levels: list[shapes.LevelRun]) -> GroupAnswer:
    return GroupAnswer(**routes.answer_fields(end), group=group, level=level, levels=levels)


def _visible(client: AgentPoolClient, pool: str, tenant: str) -> bool:
    p = client.config.pool(pool)
    return p is not None and p.tenant == tenant


class LevelStatus(msgspec.Struct, kw_only=True):
    level: str
    pool: str | None  # None: no pool is this level
    status: str = "missing"
    agents_ready: int = 0
    agents_desired: int = 0
    depth: int = 0  # ready + in flight over its agents
    processed: int = 0
    errors: int = 0
    error_rate: float = 0.0
    p50_latency_ms: float = 0.0  # the median of its agents' latest requests, weighted by requests


class GroupStatus(msgspec.Struct, kw_only=True):
    group: str
    levels: list[LevelStatus]


async def group_status(request: Request) -> Response:
    """``GET /v1/groups/{group}``: per level, its agents ready/desired, depth, processed, error
    rate and p50 latency."""
    principal = await require(request, "ask", "admin")
    client = _client(request)
    name = request.path_params["group"]
    g = client.config.groups.get(name)
    everyone = fleet_wide(principal)
    pools = {lv: client.config.level_pool(name, lv) for lv in g.levels} if g else {}
    mine = {lv: p for lv, p in pools.items() if p and (everyone or _visible(client, p, principal.tenant))}
    if g is None or not mine:
        raise NotFound(f"no group named {name!r}", error_code="GROUP_NOT_FOUND", details={"group": name})
    out = []
    with translated(client.settings.redis_url):
        for lv in g.levels:
            pool = mine.get(lv)
            if pool is None:
                out.append(LevelStatus(level=lv, pool=None))
                continue
            s = await client.fleet.status(pool)
            processed = sum(r.processed for r in s.replicas)
            errors = sum(r.errors for r in s.replicas)
            out.append(
                LevelStatus(
                    level=lv,
                    pool=pool,
                    status=s.status,
                    agents_ready=sum(d.ready for d in s.deployments),
                    agents_desired=sum(d.desired for d in s.deployments),
                    depth=sum(r.depth for r in s.replicas),
                    processed=processed,
                    errors=errors,
                    error_rate=round(errors / processed, 4) if processed else 0.0,
                    p50_latency_ms=_weighted_median([(r.p50_latency_ms, r.processed) for r in s.replicas]),
                )
            )
    return JSON(GroupStatus(group=name, levels=out))


def _weighted_median(values: list[tuple[float, int]]) -> float:
    values = sorted((v, w) for v, w in values if w > 0)
    half, seen = sum(w for _, w in values) / 2, 0
    for v, w in values:
        seen += w
        if seen >= half:
            return round(v, 3)
    return 0.0


# --- the direct endpoint


async def agent_ask(request: Request) -> Response:
    """``POST /v1/agents/{agent_id}/ask``: one agent answers (its depth bound still holds: 503
    AGENT_SATURATED); an unknown agent, or another tenant's, is 404 AGENT_NOT_FOUND."""
    client = _client(request)
    principal = await require(request, "ask")
    agent_id = request.path_params["agent_id"]
    with translated(client.settings.redis_url):
        pool = await client.find_agent(agent_id, principal.tenant)
    if pool is None:
        raise NotFound(
            f"no agent {agent_id!r} (unknown, not ready, or not yours)",
            error_code="AGENT_NOT_FOUND",
            details={"agent_id": agent_id},
        )
    a = await admission.admit(request, principal, pool)
    if a.body.n > 1:
        raise BadRequest(
            "the direct endpoint talks to one agent: n > 1 spreads runs over a pool (POST /v1/ask/{pool})",
            error_code="VALIDATION_ERROR",
            details={"field": "n"},
        )
    a.agent_id = agent_id
    return await routes.answer(request, a)
