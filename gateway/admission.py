"""What happens to an ask before its answer: who, which pool, rate limit, body, idempotency, publish.

:func:`admit` runs in cheap-first order (auth, the tenant's pool, the rate limit, then the body),
so a caller without a key or over its limit never makes the gateway read a body. :func:`start`
claims the ``Idempotency-Key``, records the request's tenant (``owner:{id}``, checked by
``GET /v1/requests/{id}``), persists a webhook delivery, and publishes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import cast

from starlette.requests import Request

from agentpool.broker import shapes, tenants
from agentpool.broker.client import AgentPoolClient, Ticket, new_id
from agentpool.broker.redis_conn import REDIS_ERRORS, translated
from agentpool.broker.streams import REPLY_TTL_S, Subscription
from agentpool.gateway.auth import Principal, pool_for, require
from agentpool.gateway.background import Background
from agentpool.gateway.http import decode, read_body, traceparent
from agentpool.gateway.idempotency import IDEM_TTL_S, Claim, Idempotency, fingerprint, idempotency_key
from agentpool.gateway.ratelimit import RateLimiter, limits_for
from agentpool.gateway.schemas import MAX_BODY_BYTES, MAX_CONTEXT_CHARS, AskBody, GroupAskBody
from agentpool.gateway.urlcheck import check_webhook_url
from agentpool.gateway.webhooks import START_GRACE_S, Deliverer
from agentpool.shared.config import Pool
from agentpool.shared.errors import BadRequest, NotFound, RateLimited
from agentpool.shared.messages import EVENT_DECODER, Chat, Error

log = logging.getLogger("agentpool.gateway")


@dataclass(slots=True)
class Admitted:
    principal: Principal
    pool_name: str
    pool: Pool
    body: AskBody
    idem_key: str | None
    rate_headers: dict[str, str] = field(default_factory=dict)
    chat: Chat | None = None  # an OpenAI/Anthropic-style call (gateway.compat)
    agent_id: str | None = None  # the direct endpoint's replica


@dataclass(slots=True)
class Started:
    """A published (or, for an idempotent repeat, earlier) request and how to answer it."""

    ticket: Ticket
    sub: Subscription | None
    accepted: bool = False  # webhook mode: answer 202 now
    replay: bool = False


def _client(request: Request) -> AgentPoolClient:
    return request.app.state.client  # type: ignore[no-any-return]


async def admit(request: Request, principal: Principal | None = None, name: str | None = None) -> Admitted:
    """401/403/404/429/400/413 in that order, or an admitted request (to the path's pool, or
    ``name``: the direct endpoint's agent's pool, its caller authenticated already)."""
    principal = principal or await require(request, "ask")
    name = name or request.path_params["pool"]
    pool = pool_for(_client(request), principal, name)
    rate_headers = await rate_limit(request, principal, name, pool)
    body = decode(await read_body(request, MAX_BODY_BYTES), AskBody)
    return await _admitted(request, principal, name, pool, body, rate_headers)


async def admit_group(request: Request) -> tuple[Admitted, GroupAskBody, list[tuple[str, str]]]:
    """A group ask: the body names the level, so it is read before the pool's rate limit. With it,
    the (level, pool) chain to try (the asked level, then the higher ones when escalating)."""
    principal = await require(request, "ask")
    body = decode(await read_body(request, MAX_BODY_BYTES), GroupAskBody)
    client = _client(request)
    chain = shapes.group_levels(client, request.path_params["group"], body.level, body.escalate)
    name = chain[0][1]
    pool = pool_for(client, principal, name)
    if body.escalate and (body.n > 1 or body.webhook_url is not None or idempotency_key(request)):
        raise BadRequest(
            "escalate works on one run answered in the response: not with n > 1, webhook_url or an "
            "Idempotency-Key",
            error_code="VALIDATION_ERROR",
            details={"field": "escalate"},
        )
    rate_headers = await rate_limit(request, principal, name, pool)
    return await _admitted(request, principal, name, pool, body, rate_headers), body, chain


async def _admitted(
    request: Request, principal: Principal, name: str, pool: Pool, body: AskBody, rate_headers: dict[str, str]
) -> Admitted:
    key = idempotency_key(request)
    check_body(body)
    if body.n > 1:
        if key is not None:
            raise BadRequest(
                "Idempotency-Key cannot be combined with n > 1 (each run is a request of its own)",
                error_code="VALIDATION_ERROR",
                details={"header": "Idempotency-Key"},
            )
        _client(request).check_fan_out(name, body.n)
        rate_headers = await rate_limit(request, principal, name, pool, cost=body.n - 1) or rate_headers
    if body.webhook_url is not None:
        await check_webhook_url(body.webhook_url, request.app.state.config.webhooks)
    return Admitted(principal, name, pool, body, key, rate_headers)


async def rate_limit(
    request: Request, principal: Principal, name: str, pool: Pool, cost: int = 1
) -> dict[str, str]:
    """Charge the caller's and the pool's limits ``cost`` requests (429 when one has not that many)."""
    client = _client(request)
    limiter: RateLimiter = request.app.state.limiter
    verdict = await limiter.check(limits_for(client.config, client.names, principal, name, pool), cost)
    headers = verdict.headers() if verdict is not None else {}
    request.state.rate_headers = headers  # the error handler adds them to error answers too
    if verdict is not None and not verdict.allowed:
        client.history.refused(tenants.runs_in(name, pool, principal.tenant), 429)
        raise RateLimited(
            f"rate limit of {verdict.limit} requests per minute exceeded",
            retry_after_s=verdict.retry_after_s,
            details={"limit_per_minute": verdict.limit},
        )
    return headers


def check_body(body: AskBody) -> None:
    """Limits msgspec cannot express on one field."""
    total = sum(len(k) + len(v) for k, v in body.context_variables.items())
    if total > MAX_CONTEXT_CHARS:
        raise BadRequest(
            f"context_variables hold {total} characters; at most {MAX_CONTEXT_CHARS}",
            error_code="VALIDATION_ERROR",
            details={"field": "context_variables"},
        )
    if body.webhook_url is not None and body.stream:
        raise BadRequest(
            "webhook_url and stream cannot be combined: a webhook request answers 202",
            error_code="VALIDATION_ERROR",
            details={"field": "stream"},
        )
    if body.n > 1 and body.webhook_url is not None:
        raise BadRequest(
            "webhook_url cannot be combined with n > 1: a webhook delivers one answer",
            error_code="VALIDATION_ERROR",
            details={"field": "webhook_url"},
        )
    if body.n == 1 and (body.timeout_s is not None or body.select != "all"):
        field_name = "timeout_s" if body.timeout_s is not None else "select"
        raise BadRequest(
            f"{field_name} applies to a fan-out: send n > 1 with it",
            error_code="VALIDATION_ERROR",
            details={"field": field_name},
        )
    if (
        body.max_wait_s is not None
        and body.pool_options is not None
        and body.pool_options.max_wait_time is not None
    ):
        raise BadRequest(
            "max_wait_s and pool_options.max_wait_time are the same setting: send one",
            error_code="VALIDATION_ERROR",
            details={"field": "pool_options.max_wait_time"},
        )


async def start(request: Request, a: Admitted) -> Started:
    client = _client(request)
    rid, tid = new_id(), a.body.thread_id or new_id()
    start_by = time.time() + (a.body.wait_s() or a.pool.limits.max_wait_s)
    idem: Idempotency = request.app.state.idempotency
    claim: Claim | None = None
    with translated(client.settings.redis_url):
        if a.idem_key is not None:
            claim = Claim(
                request_id=rid,
                thread_id=tid,
                fingerprint=fingerprint(a.pool_name, a.body, a.chat),
                start_by=start_by,
                webhook=a.body.webhook_url is not None,
                claimed_at=time.time(),
            )
            while (first := await idem.claim(a.principal.tenant, a.idem_key, claim)) is not None:
                settled = await idem.settled(a.principal.tenant, a.idem_key, first)
                if settled is None:
                    continue  # released or taken over meanwhile: claim again
                if not await _never_started(client, settled):
                    return await _replay(client, a, settled)
                if await idem.take_over(a.principal.tenant, a.idem_key, settled, claim):
                    break  # this request is the key's first now
        await client.redis.set(client.names.owner(rid), a.principal.tenant, ex=REPLY_TTL_S)
        if a.body.webhook_url is not None:
            await _deliverer(request).schedule(
                rid,
                url=a.body.webhook_url,
                tenant=a.principal.tenant,
                pool=a.pool_name,
                thread_id=tid,
                start_by=start_by,
            )
    try:
        sub, ticket = await client.submit_subscribed(
            a.pool_name,
            a.body.content,
            request_id=rid,
            thread_id=tid,
            tenant=a.principal.tenant,
            max_wait_s=a.body.wait_s(),
            context_variables=a.body.context_variables,
            traceparent=traceparent(request),  # valid or None: never stored long
            chat=a.chat,
            keep_s=IDEM_TTL_S if a.idem_key is not None else 0,  # kept by the worker, whoever accepted
            agent_id=a.agent_id,
            warm_only=a.body.warm_only,
        )
    except BaseException:
        await _undo(request, a, rid)
        raise
    if claim is not None and a.idem_key is not None:
        try:
            await idem.published(a.principal.tenant, a.idem_key, claim)
        except REDIS_ERRORS as e:  # it is queued: answer it; a repeat may time it out and run again
            log.warning("request %s: could not mark its Idempotency-Key claim published: %s", rid, e)
    _follow_up(request, a, ticket, sub)
    accepted = a.body.webhook_url is not None
    return Started(ticket, None if accepted else sub, accepted=accepted)


async def _undo(request: Request, a: Admitted, rid: str) -> None:
    """Never published: a retry with the same Idempotency-Key must go through; no webhook follows;
    no owner record is left for a request id nobody will ever read."""
    with contextlib.suppress(*REDIS_ERRORS):
        await _client(request).redis.delete(_client(request).names.owner(rid))
    if a.idem_key is not None:
        await request.app.state.idempotency.release(a.principal.tenant, a.idem_key, rid)
    if a.body.webhook_url is not None:
        await _deliverer(request).cancel(rid)


def _follow_up(request: Request, a: Admitted, ticket: Ticket, sub: Subscription) -> None:
    """Background work at the request's end: make its webhook due; keep an idempotent result 24 h."""
    client = _client(request)
    idem: Idempotency = request.app.state.idempotency
    rid = ticket.request_id
    after: list[Callable[[], Awaitable[None]]] = []
    if a.idem_key is not None:
        after.append(lambda: idem.keep_result(rid))
    if a.body.webhook_url is not None:  # this task owns the subscription (no HTTP reader)
        after.append(lambda: _deliverer(request).ready(rid))
        watch_ticket, watch_sub = ticket, sub
    elif after:  # the HTTP answer owns the subscription and the routing bookkeeping
        watch_ticket = replace(ticket, replica="", start_by=None)
        watch_sub = client.reader.subscribe(client.names.reply(rid))
    else:
        return
    bg: Background = request.app.state.background
    bg.spawn(_follow(client, watch_ticket, watch_sub, after), name=f"follow-{rid}")


async def _follow(
    client: AgentPoolClient, ticket: Ticket, sub: Subscription, after: list[Callable[[], Awaitable[None]]]
) -> None:
    async for _entry in client.stream_raw(ticket, sub=sub):
        pass  # stream_raw ends after the final event (writing QUEUE_TIMEOUT itself if due)
    for step in after:
        await step()


async def _never_started(client: AgentPoolClient, first: Claim) -> bool:
    """Did the key's first request end without an agent starting it? Its answer is QUEUE_TIMEOUT;
    or it has no reply at all past its start_by, or its claim is still unpublished (settled: the
    gateway that claimed the key died before publishing). Such a one is timed out here first,
    atomic with a worker that would start it, so it can never run as well."""
    reply = client.names.reply(first.request_id)

    async def head() -> list[tuple[bytes, dict[bytes, bytes]]]:
        return cast(list[tuple[bytes, dict[bytes, bytes]]], await client.redis.xrange(reply, count=1))

    entries = await head()
    if not entries:
        if first.published and time.time() < first.start_by + START_GRACE_S:
            return False  # queued, and it may still start: the repeat waits for it
        await client.time_out(first.request_id)
        entries = await head()
        if not entries:
            return False  # it ended long ago and its reply is gone (404 below)
    event = EVENT_DECODER.decode(entries[0][1][b"d"])
    return isinstance(event, Error) and event.error_code == "QUEUE_TIMEOUT"


async def _replay(client: AgentPoolClient, a: Admitted, first: Claim) -> Started:
    """The first request of this Idempotency-Key, read again from its reply stream."""
    rid = first.request_id
    ticket = Ticket(rid, first.thread_id, a.pool_name, "", "replay", first.start_by)
    if first.webhook:
        return Started(ticket, None, accepted=True, replay=True)
    if await client.redis.exists(client.names.reply(rid)):
        ticket.start_by = None  # it started (or ended): no queue deadline to enforce here
    elif time.time() > first.start_by + 1:
        raise NotFound(
            f"the result of request {rid!r} (this Idempotency-Key's first) has expired",
            error_code="REQUEST_NOT_FOUND",
            details={"request_id": rid},
        )
    return Started(ticket, client.reader.subscribe(client.names.reply(rid)), replay=True)


def _deliverer(request: Request) -> Deliverer:
    return request.app.state.webhooks  # type: ignore[no-any-return]
