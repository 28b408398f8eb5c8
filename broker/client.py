"""The client internal services use to ask pools; the gateway is a thin HTTP shell over it.

    async with AgentPoolClient.from_env() as client:
        reply = await client.ask("support", "Hi", thread_id="t-1")
        async for event in client.stream("support", "And then?", thread_id="t-1"):
            ...

One client per process: it holds one RabbitMQ connection (a few confirming channels), one Redis
pool, one reply reader task, and a membership cache refreshed from heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, cast

import msgspec

from agentpool.broker import shapes, tenants, topology
from agentpool.broker.amqp import Amqp, QueueFull, QueueGone
from agentpool.broker.fleet import Activity, Fleet
from agentpool.broker.history import Recorder
from agentpool.broker.redis_conn import REDIS_ERRORS, connect, translated
from agentpool.broker.registry import Registry
from agentpool.broker.router import Router, check_strategies
from agentpool.broker.streams import ATTEMPT_STARTS, CHUNK_COUNT, ReplyReader, ReplyStore, Subscription
from agentpool.shared import metrics
from agentpool.shared.config import SAMPLING, Config, Pool, load_config
from agentpool.shared.errors import (
    AgentPoolError,
    BadRequest,
    Interrupted,
    NotFound,
    RequestFailed,
    StateConflict,
    Unavailable,
)
from agentpool.shared.messages import (
    EVENT_DECODER,
    FINAL_TYPES,
    REQUEST_ENCODER,
    Chat,
    End,
    Error,
    Event,
    Interrupt,
    Message,
    Request,
    Resume,
)
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings
from agentpool.shared.tasks import cancel_and_wait

log = logging.getLogger("agentpool.client")

THREAD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MEMBERSHIP_REFRESH_S = 0.5
REPLY_IDLE_TIMEOUT_S = 600.0  # no event at all for this long: give up on the reply
KEEPALIVE = (b"", b"", b"")
READY_PING_TIMEOUT_S = 1.0


@dataclass(slots=True)
class Ticket:
    """A published request."""

    request_id: str
    thread_id: str
    pool: str
    replica: str
    tier: str
    start_by: float | None = None


def new_id() -> str:
    return uuid.uuid4().hex


def check_thread_id(thread_id: str, name: str = "thread_id", details: dict[str, str] | None = None) -> str:
    """``thread_id`` if it is 1-128 characters of A-Z a-z 0-9 . _ : -, else a 400 naming ``name``."""
    if not THREAD_ID.match(thread_id):
        raise BadRequest(
            f"{name} must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            error_code="VALIDATION_ERROR",
            details=details or {"field": name},
        )
    return thread_id


def check_callers_turn(messages: list[Message]) -> None:
    """A conversation a model can answer ends with the caller's turn: a user message, or the
    results of the assistant's tool calls."""
    if not messages or messages[-1].role == "assistant":
        raise BadRequest(
            "the last message must be the user's (or the results of the assistant's tool calls)",
            error_code="VALIDATION_ERROR",
            details={"field": "messages"},
        )


def conversation_key(chat: Chat) -> str:
    """A stateless conversation's routing key: a hash of the caller's system text and its first
    user message, which every later call of the conversation repeats."""
    first = next((m.content for m in chat.messages if m.role == "user"), "")
    digest = hashlib.blake2b(f"{chat.system}\x1f{first}".encode(), digest_size=12).hexdigest()
    return f"conversation:{digest}"


class AgentPoolClient:
    def __init__(self, settings: Settings, config: Config) -> None:
        self.settings = settings
        self.config = config
        self.names = Names(settings.namespace)
        self.amqp = Amqp(settings.amqp_url)
        self.redis = connect(settings.redis_url)
        self.reader = ReplyReader(settings.redis_url)
        self.registry = Registry(self.redis, self.names)
        self.store = ReplyStore(self.redis, self.names)
        self.router = Router(settings.routing)
        self.fleet = Fleet(self.redis, self.names, config)
        self.activity = Activity(self.fleet)  # last request per pool, for idle shrink and wake
        self.history = Recorder(self.redis, self.names)  # refusals, for the dashboard's charts
        self._tenant_pools: dict[str, float] = {}  # per-tenant pool -> registration checked until
        self._refresher: asyncio.Task[None] | None = None
        self._state = "new"

    @classmethod
    def from_env(cls, settings: Settings | None = None, config: Config | None = None) -> AgentPoolClient:
        settings = settings or Settings.from_env()
        return cls(settings, config or load_config(settings.config_path))

    # --- lifecycle
    async def __aenter__(self) -> AgentPoolClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"client is {self._state}; a closed client cannot be reopened")
        self._state = "open"
        try:
            with translated(self.settings.redis_url):
                await self.redis.ping()
            check_strategies(self.config)
            await self.amqp.connect()
            ch = await self.amqp.channel()
            for name in tenants.static_pools(self.config):  # a template's pools are {template}--{tenant}
                await topology.declare_pool(ch, self.names, name)
            await ch.close()
            await self.reader.start()
            await self.refresh_membership()
        except BaseException:
            await self.aclose()
            raise
        self._refresher = asyncio.create_task(self._refresh_loop(), name="membership")

    async def aclose(self) -> None:
        self._state = "closed"
        await cancel_and_wait([self._refresher])
        with contextlib.suppress(*REDIS_ERRORS):
            await self.activity.flush()  # the last requests still count toward keeping pools awake
            await self.history.flush()
        await self.reader.aclose()
        await self.amqp.aclose()
        await self.redis.aclose()

    async def refresh_membership(self) -> None:
        for name in [*self.config.pools, *self._tenant_pools]:
            self.router.update(name, await self.registry.replicas(name))
            metrics.pool_ready(name, len(self.router.members(name)))

    async def apply_config(self, config: Config) -> None:
        """Serve ``config`` from now on (a config API's new document, a reloaded file): the queues of
        its new pools are declared before any request can be routed to them. A custom strategy
        that does not import refuses the config (ConfigError)."""
        check_strategies(config)
        new = set(tenants.static_pools(config)) - set(tenants.static_pools(self.config))
        if new:
            ch = await self.amqp.channel()
            for name in sorted(new):
                await topology.declare_pool(ch, self.names, name)
            await ch.close()
        self.config = self.fleet.config = self.fleet.tenants.config = config
        await self.refresh_membership()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(MEMBERSHIP_REFRESH_S)
            try:
                await self.refresh_membership()
                await self.activity.flush()
                await self.history.flush()
            except REDIS_ERRORS as e:
                log.warning("membership refresh failed: %s", e)

    async def ready(self) -> dict[str, bool]:
        """Per dependency: is it reachable right now (for /readyz; Redis gets a real PING)."""
        try:
            async with asyncio.timeout(READY_PING_TIMEOUT_S):
                redis_ok = bool(await self.redis.ping())
        except (*REDIS_ERRORS, TimeoutError):
            redis_ok = False
        return {"rabbitmq": self.amqp.is_connected, "redis": redis_ok}

    # --- asking
    def pool(self, name: str) -> Pool:
        pool = self.config.pool(name)
        if pool is None:
            raise NotFound(f"no pool named {name!r}", error_code="POOL_NOT_FOUND", details={"pool": name})
        return pool

    async def submit(
        self,
        pool: str,
        content: str,
        *,
        thread_id: str | None = None,
        tenant: str | None = None,
        max_wait_s: float | None = None,
        context_variables: dict[str, str] | None = None,
        request_id: str | None = None,
        traceparent: str | None = None,
        keep_s: int = 0,
        track: bool = False,
        chat: Chat | None = None,
        run: int = 0,
        runs: int = 0,
        seed: int = 0,
        agent_id: str | None = None,
        warm_only: bool = False,
    ) -> Ticket:
        """Route and publish one request; returns once the broker confirmed it.

        ``chat``: an OpenAI/Anthropic-style call's conversation and options (see
        :class:`~agentpool.shared.messages.Chat`). A stateless one has no thread: it is routed by a
        hash of its first messages, so the same conversation keeps going to the same agent.

        ``run``/``runs``/``seed``: run ``run`` of a best-of-``runs`` fan-out (see :meth:`fan_out`).
        ``agent_id``: straight to that replica, bypassing the strategy but not its depth bound
        (503 AGENT_SATURATED when it is full). ``warm_only``: 503 POOL_COLD instead of waking a
        pool that has no live replica."""
        p = self.pool(pool)
        if thread_id is not None:
            check_thread_id(thread_id)
        self._check_variables(pool, p, context_variables or {})
        route_key = None
        if chat is not None:
            self._check_chat(pool, p, chat)
            if chat.stateless:
                thread_id, route_key = None, conversation_key(chat)
        tenant = tenant or p.tenant
        if p.per_tenant:
            pool = await self._tenant_pool(pool, tenant, p)
        now = time.time()
        wait_s = max_wait_s if max_wait_s is not None else p.limits.max_wait_s
        req = Request(
            request_id=request_id or new_id(),
            pool=pool,
            tenant=tenant,
            thread_id=thread_id or new_id(),
            content=content,
            created_at=now,
            start_by=now + wait_s,
            context_variables=context_variables or {},
            traceparent=traceparent,
            chat=chat,
            keep_s=keep_s,
            run=run,
            runs=runs,
            seed=seed,
        )
        if agent_id is not None:
            replica, tier = await self._publish_direct(req, p, agent_id, track)
        else:
            if warm_only and not self.router.members(pool):
                await self.refresh_membership()
                if not self.router.members(pool):
                    raise Unavailable(
                        f"pool {pool!r} has no warm agent (prefer_warm: it is not woken for this request)",
                        error_code="POOL_COLD",
                        retry_after_s=5,
                        details={"pool": pool},
                    )
            replica, tier = await self._publish(req, p, track, route_key)
        return Ticket(req.request_id, req.thread_id, pool, replica, tier, req.start_by)

    async def find_agent(self, agent_id: str, tenant: str | None = None) -> str | None:
        """The pool of the ready replica ``agent_id`` (among ``tenant``'s pools when given): as
        requests name it, so a per-tenant pool's template."""
        for name, p in self._agent_pools(agent_id):
            parts = tenants.split(name)
            owner = parts[1] if parts else p.tenant
            if tenant is not None and owner != tenant:
                continue
            if not any(r.id == agent_id for r in self.router.members(name)):
                self.router.update(name, await self.registry.replicas(name))  # it may be new
            if any(r.id == agent_id for r in self.router.members(name)):
                return parts[0] if parts else name
        return None

    def _agent_pools(self, agent_id: str) -> list[tuple[str, Pool]]:
        """Pools whose replica ids ``agent_id`` could be (``{pool}-{deployment}-{n}``)."""
        found = []
        for name, p in self.config.pools.items():
            for d in p.deployments:
                tail = re.fullmatch(rf"(.+)-{re.escape(d.name)}-[0-9]+", agent_id)
                if tail is None:
                    continue
                pool = tail.group(1)
                parts = tenants.split(pool)
                if (pool == name and not p.per_tenant) or (p.per_tenant and parts and parts[0] == name):
                    found.append((pool, p))
        return found

    async def _publish_direct(self, req: Request, pool: Pool, agent_id: str, track: bool) -> tuple[str, str]:
        req.replica, req.tier = agent_id, "direct"
        try:
            await self.amqp.publish(
                self.names.replica_queue(agent_id),
                REQUEST_ENCODER.encode(req),
                message_id=req.request_id,
                headers={"thread_id": req.thread_id, "tenant": req.tenant},
            )
        except QueueFull:
            metrics.routed(req.pool, "rejected")
            self.history.refused(req.pool, 503)
            raise Unavailable(
                f"agent {agent_id!r} is full: it holds max_depth requests",
                error_code="AGENT_SATURATED",
                retry_after_s=1,
                details={"agent_id": agent_id, "max_depth": pool.limits.max_depth},
            ) from None
        except QueueGone:
            raise NotFound(
                f"no agent {agent_id!r} (it has stopped)",
                error_code="AGENT_NOT_FOUND",
                details={"agent_id": agent_id},
            ) from None
        self.router.published(agent_id, track)
        self.activity.seen(req.pool)
        metrics.routed(req.pool, "direct")
        return agent_id, "direct"

    def _check_chat(self, name: str, p: Pool, chat: Chat) -> None:
        """A conversation that ends with the caller's turn, and sampling parameters within what every
        deployment's agent type allows."""
        check_callers_turn(chat.messages)
        for dep in p.deployments:
            at = self.config.agent_types[dep.agent_type]
            if chat.max_tokens is not None and chat.max_tokens > at.max_tokens:
                raise BadRequest(
                    f"max_tokens {chat.max_tokens} is more than pool {name!r} allows "
                    f"(agent type {dep.agent_type!r}: max_tokens = {at.max_tokens})",
                    error_code="VALIDATION_ERROR",
                    details={"field": "max_tokens", "max": at.max_tokens},
                )
            kind = self.config.providers[at.provider].kind
            for param in ("temperature", "top_p"):
                if getattr(chat, param) is not None and param not in SAMPLING[kind]:
                    raise BadRequest(
                        f"{param}: pool {name!r} (agent type {dep.agent_type!r}) runs on the {kind} "
                        "provider, whose API refuses sampling parameters; leave it out",
                        error_code="VALIDATION_ERROR",
                        details={"field": param},
                    )

    def _check_variables(self, name: str, p: Pool, given: dict[str, str]) -> None:
        """Refuse a request that leaves a ``{VAR}`` of a deployment's system prompt unfilled
        (before it is queued: sent as written, it would reach the model as ``{PRODUCT}``)."""
        for dep in p.deployments:
            missing = self.config.agent_types[dep.agent_type].missing_variables(given)
            if missing:
                raise BadRequest(
                    f"pool {name!r}: the system prompt of agent type {dep.agent_type!r} uses "
                    + ", ".join(f"{{{m}}}" for m in missing)
                    + f"; send it in context_variables or give it a default in "
                    f"[agent_types.{dep.agent_type}] variables",
                    error_code="CONTEXT_VARIABLE_MISSING",
                    details={"field": f"context_variables.{missing[0]}", "missing": missing},
                )

    async def _tenant_pool(self, template: str, tenant: str, p: Pool) -> str:
        """``{template}--{tenant}``: registered on first use (503 POOL_LIMIT at the cap), queues declared."""
        name = tenants.tenant_pool(template, tenant)
        if self._tenant_pools.get(name, 0.0) > time.monotonic():
            return name
        with translated(self.settings.redis_url):
            if await self.fleet.tenants.ensure(name):
                await self.fleet.nudge("tenant", name)
        if name not in self._tenant_pools:
            ch = await self.amqp.channel()
            await topology.declare_pool(ch, self.names, name)
            await ch.close()
        self._tenant_pools[name] = time.monotonic() + min(5.0, p.idle_timeout_s / 4)
        return name

    async def _publish(
        self, req: Request, pool: Pool, track: bool, route_key: str | None = None
    ) -> tuple[str, str]:
        key = route_key or req.thread_id  # what stickiness follows: the thread, or a conversation
        plan = self.router.plan(req.pool, pool, key, req, req.run)
        if not plan and not self.router.members(req.pool):
            req.woke = True  # however it goes on, this request waits for its pool to come up
            await self.refresh_membership()  # a replica may have just come up
            plan = self.router.plan(req.pool, pool, key, req, req.run)
        headers = {"thread_id": req.thread_id, "tenant": req.tenant}
        full = False
        for replica, tier in plan:
            req.replica, req.tier = replica, tier
            try:
                await self.amqp.publish(
                    self.names.replica_queue(replica),
                    REQUEST_ENCODER.encode(req),
                    message_id=req.request_id,
                    headers=headers,
                )
            except QueueFull:
                full = True
                continue
            except QueueGone:  # the replica drained and deleted its queue since our last refresh
                continue
            self.router.published(replica, track)
            self.activity.seen(req.pool)
            metrics.routed(req.pool, tier)
            return replica, tier
        if plan and not full:  # every replica in the plan is gone: see who is left
            await self.refresh_membership()
        if full or (not plan and self.router.members(req.pool)):
            metrics.routed(req.pool, "rejected")
            self.history.refused(req.pool, 503)
            raise Unavailable(
                f"pool {req.pool!r} is saturated: every replica is at its depth limit",
                error_code="POOL_SATURATED",
                retry_after_s=1,
                details={"pool": req.pool, "max_depth": pool.limits.max_depth},
            )
        # No live replica: park the request on the pool's shared queue; a replica that starts
        # (or wakes) consumes it. It still ends by QUEUE_TIMEOUT if none comes in time.
        req.replica, req.tier = "", "queued"
        await self.amqp.publish(
            self.names.pool_queue(req.pool),
            REQUEST_ENCODER.encode(req),
            message_id=req.request_id,
            headers=headers,
        )
        metrics.routed(req.pool, "queued")
        self.activity.seen(req.pool)
        with translated(self.settings.redis_url):
            await self.fleet.wake(req.pool)  # supervisors start a replica of a pool idle at zero
        return "", "queued"

    async def stream_raw(
        self,
        ticket: Ticket,
        after: bytes = b"0-0",
        sub: Subscription | None = None,
        keepalive_s: float | None = None,
    ) -> AsyncIterator[tuple[bytes, bytes, bytes]]:
        """Reply entries ``(entry id, type, json)`` until the final one; enforces ``start_by``.

        With ``keepalive_s``, yields ``KEEPALIVE`` whenever that long passes with no entry.
        """
        if sub is None:
            key = self.names.reply(ticket.request_id)
            chunks = await self._chunks_at(key, after) if after != b"0-0" else None
            sub = self.reader.subscribe(key, after, chunks)
        started = after != b"0-0"
        idle_since = time.monotonic()
        try:
            while True:
                deadline = idle_since + REPLY_IDLE_TIMEOUT_S
                if not started and ticket.start_by is not None:
                    deadline = time.monotonic() + max(0.0, ticket.start_by - time.time()) + 0.5
                wait = max(0.0, deadline - time.monotonic())
                tick = keepalive_s is not None and wait > keepalive_s
                try:
                    entry = await sub.next(keepalive_s if tick else wait)
                except TimeoutError:
                    if tick:
                        yield KEEPALIVE
                    else:
                        await self._timeout(ticket, started)
                        idle_since = time.monotonic()
                        started = True  # the timeout's own error event comes next
                    continue
                idle_since = time.monotonic()
                kind = entry[1]
                if kind == b"start":
                    started = True
                yield entry
                if kind in FINAL_TYPES:
                    return
        finally:
            sub.close()
            if ticket.replica:
                self.router.finished(ticket.replica)

    async def _chunks_at(self, key: str, entry_id: bytes) -> int | None:
        """The attempt's chunk count as of a reply entry (None if that entry is gone), so a resumed
        stream notices a chunk missing right after the point it resumes from."""
        found = cast(list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrange(key, entry_id, entry_id))
        if not found:
            return None
        fields = found[0][1]
        count = fields.get(CHUNK_COUNT)
        if count is not None:
            return int(count)
        return 0 if fields[b"t"] in ATTEMPT_STARTS else None

    async def _timeout(self, ticket: Ticket, started: bool) -> None:
        if not started:
            await self.time_out(ticket.request_id)
            return
        why = f"no reply event for {REPLY_IDLE_TIMEOUT_S:.0f}s"
        await self.store.finish(Error(request_id=ticket.request_id, error_code="REPLY_TIMEOUT", error=why))
        await self.store.cancel(ticket.request_id)

    async def time_out(self, request_id: str) -> None:
        """End a request that no agent started in time with ``QUEUE_TIMEOUT``, unless it has a final
        event already (atomic with the worker's own final write: whichever comes first is the
        answer), and mark it cancelled, so an agent that finds it later drops it."""
        why = "no agent started the request before its max_wait_s"
        await self.store.finish(Error(request_id=request_id, error_code="QUEUE_TIMEOUT", error=why))
        await self.store.cancel(request_id)

    async def stream(self, pool: str, content: str, **kwargs: object) -> AsyncIterator[Event]:
        """Submit and yield decoded events (``start``, ``chunk``..., ``end`` or ``error``)."""
        sub, ticket = await self.submit_subscribed(pool, content, **kwargs)
        async for _id, _kind, data in self.stream_raw(ticket, sub=sub):
            yield EVENT_DECODER.decode(data)

    async def submit_subscribed(
        self, pool: str, content: str, **kwargs: object
    ) -> tuple[Subscription, Ticket]:
        rid = str(kwargs.pop("request_id", None) or new_id())
        # Subscribe before publishing, so reading overlaps the publisher confirm.
        sub = self.reader.subscribe(self.names.reply(rid))
        try:
            ticket = await self.submit(pool, content, request_id=rid, track=True, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            sub.close()
            raise
        return sub, ticket

    async def ask(self, pool: str, content: str, **kwargs: object) -> End:
        """Submit and wait for the answer; raises :class:`RequestFailed` on an ``error`` event and
        :class:`Interrupted` when the run pauses for a human's approval (see :meth:`resume`)."""
        sub, ticket = await self.submit_subscribed(pool, content, **kwargs)
        return await self.result(ticket, sub=sub)

    async def fan_out(
        self,
        pool: str,
        content: str,
        *,
        n: int,
        select: Literal["all", "first"] = "all",
        timeout_s: float | None = None,
        **kwargs: object,
    ) -> shapes.FanOutResult:
        """Best-of-N: the same question ``n`` times in parallel, over distinct replicas where the
        pool has enough (each run with its own request id, run index and seed for the prompt
        renderer). ``select="first"`` cancels the others once one answers; at ``timeout_s`` the
        runs still going are cancelled and listed as failed."""
        self.check_fan_out(pool, n)
        return await shapes.fan_out(self, pool, content, n, select=select, timeout_s=timeout_s, **kwargs)

    def check_fan_out(self, pool: str, n: int) -> None:
        """1..16 runs, on a pool whose runs cannot pause for a human (N pauses of one question)."""
        if not 1 <= n <= shapes.MAX_RUNS:
            raise BadRequest(
                f"n must be 1..{shapes.MAX_RUNS}", error_code="VALIDATION_ERROR", details={"field": "n"}
            )
        p = self.pool(pool)
        if n > 1 and any(self.config.agent_types[d.agent_type].approval_required for d in p.deployments):
            raise BadRequest(
                f"pool {pool!r} has tools that need a human's approval; a fan-out (n > 1) cannot pause",
                error_code="VALIDATION_ERROR",
                details={"field": "n"},
            )

    async def ask_group(
        self, group: str, content: str, *, level: str, escalate: bool = False, **kwargs: object
    ) -> tuple[End, list[shapes.LevelRun]]:
        """Ask ``group``'s pool of ``level``; with ``escalate``, a failed run (or an answer its
        level's validator rejects) is asked again one level up. The answer and the levels that ran."""
        return await shapes.ask_group(self, group, content, level=level, escalate=escalate, **kwargs)

    async def ask_agent(
        self, agent_id: str, content: str, *, tenant: str | None = None, **kwargs: object
    ) -> End:
        """Ask one replica directly (404 AGENT_NOT_FOUND if no such ready agent; 503
        AGENT_SATURATED when it is full)."""
        pool = await self.find_agent(agent_id, tenant)
        if pool is None:
            raise NotFound(
                f"no agent {agent_id!r}", error_code="AGENT_NOT_FOUND", details={"agent_id": agent_id}
            )
        return await self.ask(pool, content, agent_id=agent_id, tenant=tenant, **kwargs)

    async def result(self, ticket: Ticket, sub: Subscription | None = None) -> End:
        async for _id, kind, data in self.stream_raw(ticket, sub=sub):
            if kind == b"end":
                return msgspec.json.decode(data, type=End)
            if kind == b"interrupt":
                raise Interrupted(msgspec.json.decode(data, type=Interrupt))
            if kind == b"error":
                err = msgspec.json.decode(data, type=Error)
                raise RequestFailed(
                    err.error, error_code=err.error_code, details={"request_id": err.request_id}
                )
        raise AgentPoolError("reply stream ended without a final event")

    # --- human approval
    async def resume(
        self, request_id: str, *, approve: bool, reason: str = "", tenant: str | None = None
    ) -> End:
        """Continue a run paused for approval (on any replica of its pool) and wait for its answer;
        may raise :class:`Interrupted` again if the run reaches another call that needs approval."""
        sub, ticket = await self.resume_subscribed(request_id, approve=approve, reason=reason, tenant=tenant)
        return await self.result(ticket, sub=sub)

    async def resume_stream(
        self, request_id: str, *, approve: bool, reason: str = "", tenant: str | None = None
    ) -> AsyncIterator[Event]:
        """:meth:`resume`, as the continuation's events."""
        sub, ticket = await self.resume_subscribed(request_id, approve=approve, reason=reason, tenant=tenant)
        async for _id, _kind, data in self.stream_raw(ticket, sub=sub):
            yield EVENT_DECODER.decode(data)

    async def resume_subscribed(
        self, request_id: str, *, approve: bool, reason: str = "", tenant: str | None = None
    ) -> tuple[Subscription, Ticket]:
        """Claim the paused run (once: a second resume is 409 ALREADY_RESUMED) and publish its
        continuation, a new request whose reply stream carries the rest of the run."""
        rid = new_id()
        with translated(self.settings.redis_url):
            status, values = await self.store.claim_resume(request_id, rid, tenant or "")
        if status == -1:
            raise StateConflict(
                f"request {request_id!r} is not waiting for approval (unknown, finished, or expired)",
                error_code="NOT_WAITING",
                details={"request_id": request_id},
            )
        if status != 1:
            raise StateConflict(
                f"request {request_id!r} was resumed already",
                error_code="ALREADY_RESUMED",
                details={"request_id": request_id, "resumed_by": values[0]},
            )
        pool, owner, thread_id = values
        sub = self.reader.subscribe(self.names.reply(rid))
        try:
            ticket = await self._publish_resume(
                rid, pool, owner, thread_id, Resume(request_id=request_id, approve=approve, reason=reason)
            )
        except BaseException:
            sub.close()
            with contextlib.suppress(*REDIS_ERRORS):
                await self.store.release_resume(request_id, rid)
            raise
        return sub, ticket

    async def _publish_resume(
        self, rid: str, pool: str, tenant: str, thread_id: str, resume: Resume
    ) -> Ticket:
        p = tenants.pool_config(self.config, pool)
        if p is None:
            raise NotFound(f"no pool named {pool!r}", error_code="POOL_NOT_FOUND", details={"pool": pool})
        now = time.time()
        req = Request(
            request_id=rid,
            pool=pool,
            tenant=tenant,
            thread_id=thread_id,
            content="",
            created_at=now,
            start_by=now + p.limits.max_wait_s,
            resume=resume,
        )
        replica, tier = await self._publish(req, p, True)
        return Ticket(rid, thread_id, pool, replica, tier, req.start_by)
