"""A warm replica: connects, warms its provider, heartbeats, consumes, and drains on stop.

``Worker.async_run(stop)`` is the entry tests drive; signal handling lives in the runner
(:mod:`agentpool.workers.main`). Lifecycle: ``starting`` (connect, declare, warm) -> ``ready`` (consuming
its own queue and the pool's shared queue, prefetch = concurrency shared across both) ->
``draining`` (consumers cancelled, in-flight work finishes until the deadline, the rest is
nacked back) -> deregistered -> its own queue deleted once empty (requests still in it dead-letter
into the pool's shared queue within ``rescue_after_s``; if it does not empty in time, ``x-expires``
removes it later).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from agentpool.broker import topology
from agentpool.broker.amqp import Amqp
from agentpool.broker.client import MEMBERSHIP_REFRESH_S
from agentpool.broker.history import Recorder
from agentpool.broker.redis_conn import REDIS_ERRORS, connect
from agentpool.broker.registry import HEARTBEAT_INTERVAL_S, Registry, ReplicaInfo
from agentpool.broker.streams import ReplyStore
from agentpool.shared.config import Config
from agentpool.shared.errors import ConfigError, ProviderError
from agentpool.shared.messages import REQUEST_DECODER, WIRE_VERSION, Error, Request, Usage
from agentpool.shared.names import Names, replica_id
from agentpool.shared.settings import Settings
from agentpool.shared.tasks import cancel_and_wait
from agentpool.workers.agents import LLM, OpenedAgent, open_agent
from agentpool.workers.agents.loop import ToolBox
from agentpool.workers.agents.python import FactoryFailed
from agentpool.workers.job import Outcome, log_fields, run_job
from agentpool.workers.prompting import Renderer, default_renderer, load_renderer
from agentpool.workers.providers import build_provider
from agentpool.workers.replica_metrics import ReplicaMetrics
from agentpool.workers.tools.base import ToolSourceError
from agentpool.workers.validation import Validator, load_validator

log = logging.getLogger("agentpool.worker")

DRAIN_TIMEOUT_S = 30.0
REDIS_RETRY_DELAY_S = 1.0
CANCEL_POLL_S = 0.5  # how often requests in flight (a long tool call writes nothing) look for a cancel
REBUILD_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # an unreachable MCP server: try again, this often
RECENT_LATENCIES = 256  # the p50 a heartbeat reports is over this many latest requests
QUEUE_EMPTY_POLL_S = 0.1  # draining: how often to look whether the replica queue has emptied
QUEUE_EMPTY_MARGIN_S = 2.0  # ... for at most rescue_after_s (its messages' TTL) and this much more,
QUEUE_EMPTY_MAX_WAIT_S = 10.0  # but never longer (a long TTL: the queue is left to x-expires)
# Routers keep publishing to a replica until their membership refresh sees it draining; a message
# routed to a queue the broker deletes before enqueueing it is confirmed, then gone. So a queue is
# deleted only this long after the replica stopped saying "ready" (later publishes come back
# unroutable, and the router tries the next replica).
ROUTER_GRACE_S = 3 * MEMBERSHIP_REFRESH_S


class Worker:
    def __init__(self, settings: Settings, config: Config, pool: str, deployment: str, n: int) -> None:
        self.settings = settings
        self.config = config
        self.pool_name = pool
        self.pool = config.pools[pool]
        self.deployment = config.deployment(pool, deployment)
        self.agent_type = config.agent_types[self.deployment.agent_type]
        self.provider_config = config.providers[self.agent_type.provider]
        self.replica_id = replica_id(pool, deployment, n)
        self.names = Names(settings.namespace)
        self.renderer: Renderer = default_renderer
        self.validator: Validator | None = None
        self.amqp = Amqp(settings.amqp_url, channels=1)
        self.redis = connect(settings.redis_url)
        self.store = ReplyStore(self.redis, self.names)
        self.registry = Registry(self.redis, self.names)
        self.history = Recorder(self.redis, self.names)  # the dashboard's charts (broker/history.py)
        self.provider = build_provider(self.provider_config, self.agent_type)
        self.info = ReplicaInfo(
            id=self.replica_id,
            pool=pool,
            deployment=deployment,
            started_at=time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
            provider=self.provider_config.kind,
            model=self.agent_type.model,
        )
        self._tasks: dict[asyncio.Task[None], AbstractIncomingMessage] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._channel: AbstractChannel | None = None
        self._queues: list[AbstractQueue] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._cancel_watch: asyncio.Task[None] | None = None
        self._rebuild: asyncio.Task[None] | None = None
        self._watched: dict[str, tuple[float, Callable[[], None]]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._latency_sum_ms = 0.0
        self._recent_ms: deque[float] = deque(maxlen=RECENT_LATENCIES)  # for the p50 in heartbeats
        self.ready = asyncio.Event()
        self.metrics = ReplicaMetrics(pool, deployment, self.provider_config.kind, self.agent_type.model)
        self.on_outcome: Callable[[Outcome], None] | None = self.metrics.outcome  # metrics hook
        self.llm = LLM(self.provider, self.agent_type.retries, on_retry=self.metrics.retried)
        self.agent: OpenedAgent | None = None
        self.router_grace_s = ROUTER_GRACE_S  # 0 only where nothing else routes (a test's teardown)
        self.queue_empty_wait_s = QUEUE_EMPTY_MAX_WAIT_S

    # --- lifecycle
    async def async_run(self, stop: asyncio.Event, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        try:
            await self.start()
            await stop.wait()
            await self.drain(drain_timeout_s)
        finally:
            await self.aclose()

    async def start(self) -> None:
        t0 = time.monotonic()
        await self.redis.ping()
        await self.amqp.connect()
        self._channel = await self.amqp.channel()
        await self._channel.set_qos(prefetch_count=self.pool.limits.concurrency, global_=True)
        shared = await topology.declare_pool(self._channel, self.names, self.pool_name)
        own = await topology.declare_replica(
            self._channel, self.names, self.pool_name, self.pool, self.replica_id
        )
        self._queues = [own, shared]
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        self._cancel_watch = asyncio.create_task(self._cancel_loop(), name="cancel-watch")
        try:
            await self.provider.warm()
        except ProviderError as e:
            self.info.warmup_ms = (time.monotonic() - t0) * 1000
            self.mark_unhealthy(e.message)
            log.error("replica %s could not warm its provider: %s", self.replica_id, e.message)
            return
        built = await self._build()
        if built == "retry":
            self._rebuild = asyncio.create_task(self._rebuild_loop(t0), name="rebuild")
        if built == "ok":
            await self._go_ready(t0)

    async def _go_ready(self, t0: float) -> None:
        self.info.warmup_ms = (time.monotonic() - t0) * 1000
        self.metrics.warmed(self.info.warmup_ms)
        await self._consume()
        log.info("replica %s ready in %.0f ms", self.replica_id, self.info.warmup_ms)

    async def _build(self) -> Literal["ok", "retry", "failed"]:
        """Build the agent (tools, factory). An unreachable MCP server is worth trying again later;
        any other failure leaves the replica unhealthy for good (with the reason), never a crash loop."""
        t0 = time.monotonic()
        try:
            self.renderer = load_renderer(self.agent_type.prompt_renderer)
            self.validator = load_validator(self.pool.validator)
            self.agent = await open_agent(
                self.deployment.agent_type,
                self.agent_type,
                replica_id=self.replica_id,
                pool=self.pool_name,
                deployment=self.deployment.name,
                llm=self.llm,
                on_tool_result=self.metrics.tool_result,
            )
        except (ConfigError, FactoryFailed, ToolSourceError) as e:
            retry = isinstance(e, ToolSourceError) and e.retryable
            self._build_failed(str(e), retry)
            return "retry" if retry else "failed"
        except Exception as e:  # a bug in agentpool or a library: still no crash loop
            log.exception("replica %s: building the agent failed", self.replica_id)
            self._build_failed(f"building the agent failed: {type(e).__name__}: {e}", False)
            return "failed"
        self.info.build_ms = round((time.monotonic() - t0) * 1000, 3)
        self.metrics.built(self.info.build_ms)
        if self.info.status == "unhealthy":
            self.info.status, self.info.detail = "starting", ""
        return "ok"

    def _build_failed(self, why: str, retry: bool) -> None:
        self.mark_unhealthy(why)
        again = "; trying again" if retry else ""
        log.error("replica %s could not build its agent: %s%s", self.replica_id, why, again)

    async def _rebuild_loop(self, t0: float) -> None:
        for delay in itertools.chain(REBUILD_DELAYS_S, itertools.repeat(REBUILD_DELAYS_S[-1])):
            await asyncio.sleep(delay)
            built = await self._build()
            if built == "ok":
                await self._go_ready(t0)
            if built != "retry":
                return

    async def _consume(self) -> None:
        for q in self._queues:
            tag = await q.consume(self._on_message)
            self._consumers.append((q, tag))
        self.info.status = "ready"
        await self._beat()
        self.ready.set()

    async def _stop_consuming(self) -> None:
        consumers, self._consumers = self._consumers, []
        for q, tag in consumers:
            with contextlib.suppress(Exception):
                await q.cancel(tag)

    def mark_unhealthy(self, why: str) -> None:
        """Provider or agent unusable (bad credentials, a factory that raised): stop taking work,
        say why in the heartbeat at once."""
        self.info.status = "unhealthy"
        self.info.detail = why
        task = asyncio.get_running_loop().create_task(self._unhealthy())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unhealthy(self) -> None:
        await self._stop_consuming()
        with contextlib.suppress(*REDIS_ERRORS):
            await self._beat()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking work; finish what is in flight until the deadline; give back the rest."""
        await cancel_and_wait([self._rebuild])  # an agent built now must not start consuming
        self._rebuild = None
        self.info.status = "draining"
        with contextlib.suppress(*REDIS_ERRORS):
            await self._beat()
        routed_until = time.monotonic() + self.router_grace_s  # routers may pick this replica until then
        await self._stop_consuming()
        if self._tasks:
            log.info("replica %s draining %d in-flight request(s)", self.replica_id, len(self._tasks))
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()  # the task nacks its message back to the queue
            if pending:
                await asyncio.wait(pending, timeout=5)
        # No more beats: one would register us again, and its depth poll must not touch the queue.
        await cancel_and_wait([self._heartbeat])
        self._heartbeat = None
        with contextlib.suppress(*REDIS_ERRORS):
            await self.registry.remove(self.pool_name, self.replica_id)
        await self._delete_own_queue(routed_until)

    async def _delete_own_queue(self, routed_until: float) -> None:
        """Delete this replica's queue once it is empty, instead of leaving it to ``x-expires``.

        Requests still in it dead-letter into the pool's shared queue after ``rescue_after_s`` (the
        queue's message TTL), so this waits that long at most (and at most
        ``QUEUE_EMPTY_MAX_WAIT_S``: a replica does not linger a long TTL just to tidy up). The
        delete is ``if_empty`` (a router whose membership is a moment old may still publish here;
        the delete then fails and the wait goes on) and ``if_unused`` (a consumer would be another
        copy of this replica). If the queue does not empty in time or anything fails, it stays for
        ``x-expires``: no request is ever dropped with it. A publish after the delete comes back
        unroutable and the router tries the next replica.
        """
        name = self.names.replica_queue(self.replica_id)
        if any(not t.done() for t in self._tasks):  # past the drain deadline: they hold messages
            log.warning("replica %s: requests still running; queue %s left to expire", self.replica_id, name)
            return
        await asyncio.sleep(max(0.0, routed_until - time.monotonic()))
        if self._channel is not None:
            consuming, self._channel = self._channel, None
            try:
                # A passive declare on the consuming channel reaches the queue after the acks and
                # nacks sent on it (a nack puts its message back), so the count below sees them.
                # Then close it: nothing is unacked any more, and a robust channel closed on
                # purpose never redeclares the queue.
                raw = await consuming.get_underlay_channel()
                await raw.queue_declare(name, passive=True)
                await consuming.close()
            except Exception as e:
                log.warning("replica %s: queue %s left to expire: %s", self.replica_id, name, e)
                return
        budget = min(self.pool.limits.rescue_after_s + QUEUE_EMPTY_MARGIN_S, self.queue_empty_wait_s)
        deadline = time.monotonic() + budget
        channel: aio_pika.Channel | None = None
        why = "it did not empty"
        try:
            async with asyncio.timeout(budget + 5):  # a broker that stops answering
                while True:
                    if channel is None or channel.is_closed:  # a failed delete closes the channel
                        channel = aio_pika.Channel(self.amqp.connection, publisher_confirms=False)
                        await channel.initialize()
                    raw = await channel.get_underlay_channel()  # no robust channel's cache, no restore
                    try:
                        ok = await raw.queue_declare(name, passive=True)
                        if not ok.message_count:
                            await raw.queue_delete(name, if_empty=True, if_unused=True)
                            log.info("replica %s: queue %s deleted", self.replica_id, name)
                            return
                        why = f"{ok.message_count} request(s) still in it"
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        return  # gone already
                    except aiormq.exceptions.ChannelPreconditionFailed as e:
                        why = str(e)  # a request came in after all (or someone consumes it)
                        if "in use" in why:
                            break
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(QUEUE_EMPTY_POLL_S)
        except TimeoutError:  # before OSError, its base class
            why = "the broker did not answer"
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError, OSError, RuntimeError) as e:
            why = f"{type(e).__name__}: {e}"
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        log.warning("replica %s: queue %s not deleted (%s); x-expires removes it", self.replica_id, name, why)

    async def aclose(self) -> None:
        await cancel_and_wait([self._heartbeat, self._cancel_watch, self._rebuild])
        self.metrics.queue_ready(0)
        if self.agent is not None:
            await self.agent.aclose()
        await self.provider.aclose()
        await self.amqp.aclose()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.history.flush()  # the last requests still count in the charts
        await self.redis.aclose()

    # --- heartbeats
    async def _beat(self) -> None:
        self.info.in_flight = len(self._tasks)
        if self.info.processed:
            self.info.avg_latency_ms = round(self._latency_sum_ms / self.info.processed, 3)
        if self._recent_ms:
            self.info.p50_latency_ms = round(sorted(self._recent_ms)[len(self._recent_ms) // 2], 3)
        await self.registry.beat(self.info)
        await self.history.flush()

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                self.info.ready = await self._ready_count()
                self.metrics.queue_ready(self.info.ready)
                await self._beat()
            except REDIS_ERRORS as e:
                log.warning("heartbeat failed: %s", e)
            except Exception as e:  # broker down: keep beating what we know
                log.warning("queue depth unknown: %s", e)
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _ready_count(self) -> int:
        """Messages waiting in this replica's queue (a passive declare on the raw channel: aio-pika's
        robust channel answers passive declares from its cache)."""
        if self._channel is None:
            return 0
        raw = await self._channel.get_underlay_channel()
        ok = await raw.queue_declare(self.names.replica_queue(self.replica_id), passive=True)
        return int(ok.message_count or 0)

    @property
    def toolbox(self) -> ToolBox:
        """The built agent's tools (a replica consumes only once its agent is built)."""
        assert self.agent is not None, "the agent is not built yet"
        return self.agent.runner.ctx.toolbox

    # --- cancellation of requests that write nothing for a while (a long tool call)
    def watch_cancel(self, request_id: str, cancel: Callable[[], None]) -> None:
        self._watched[request_id] = (time.monotonic(), cancel)

    def unwatch_cancel(self, request_id: str) -> None:
        self._watched.pop(request_id, None)

    async def _cancel_loop(self) -> None:
        """Every CANCEL_POLL_S, one pipelined EXISTS over the cancel keys of requests running
        longer than that (a request that writes chunks learns of a cancel on each write)."""
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            due = time.monotonic() - CANCEL_POLL_S
            ids = [rid for rid, (since, _) in self._watched.items() if since < due]
            if not ids:
                continue
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for rid in ids:
                        p.exists(self.names.cancel(rid))
                    found = await p.execute()
            except REDIS_ERRORS as e:
                log.warning("cancel watch: %s", e)
                continue
            for rid, hit in zip(ids, found, strict=True):
                if hit and (entry := self._watched.pop(rid, None)) is not None:
                    entry[1]()

    # --- work
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks[task] = message
        task.add_done_callback(self._tasks.pop)
        self.metrics.received(message.headers, bool(message.redelivered))
        task.add_done_callback(lambda _: self.metrics.done())

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        received_at = time.time()
        try:
            req = REQUEST_DECODER.decode(message.body)
            if req.v != WIRE_VERSION:
                raise msgspec.ValidationError(f"unknown wire version {req.v}")
        except msgspec.MsgspecError as e:
            log.error(
                "unreadable message %s parked: %s",
                message.message_id,
                e,
                extra={"pool": self.pool_name, "replica": self.replica_id},
            )
            await self._park(message)
            return
        try:
            redelivered = bool(message.redelivered)
            outcome = await run_job(self, req, received_at, redelivered)
        except asyncio.CancelledError:
            await _settle(message.nack(requeue=True))
            raise
        except REDIS_ERRORS as e:
            log.warning(
                "request %s: Redis unavailable (%s); handing it back",
                req.request_id,
                e,
                extra=log_fields(self, req),
            )
            await asyncio.sleep(REDIS_RETRY_DELAY_S)
            await _settle(message.nack(requeue=True))
            return
        if log.isEnabledFor(logging.DEBUG):  # the per-request line; ids only, never contents
            log.debug(
                "request %s: %s %s",
                req.request_id,
                outcome.kind,
                outcome.error_code,
                extra=log_fields(self, req),
            )
        if outcome.kind == "parked":
            await self._park(message, outcome.final)
            self._count(outcome)
            return
        await _settle(message.ack())
        self._count(outcome)

    def _count(self, outcome: Outcome) -> None:
        if outcome.kind in ("end", "error", "interrupt"):
            self.info.processed += 1
            self._latency_sum_ms += outcome.latency_ms
            self._recent_ms.append(outcome.latency_ms)
            usage = outcome.extra.get("usage")
            self.history.ended(
                self.pool_name,
                self.deployment.name,
                outcome.latency_ms,
                outcome.kind == "error",
                usage if isinstance(usage, Usage) else None,
            )
        if outcome.kind == "error":
            self.info.errors += 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def _park(self, message: AbstractIncomingMessage, final: Error | None = None) -> None:
        """Move a poison message to the pool's parking queue, write its final event, then ack the
        original: publish (confirmed) → final event → ack. A crash or a Redis error between the
        steps redelivers the message, which at worst parks it twice; nothing is lost."""
        parked = True
        try:
            await self.amqp.publish(
                self.names.parking_queue(self.pool_name),
                message.body,
                message_id=message.message_id or "",
                headers=dict(message.headers or {}),
            )
        except Exception as e:
            log.error("could not park %s: %s; dropping it to the dead-letter path", message.message_id, e)
            parked = False
        if final is not None:
            try:
                await self.store.finish(final)
            except REDIS_ERRORS as e:
                log.warning("request %s: Redis unavailable (%s); handing it back", final.request_id, e)
                await asyncio.sleep(REDIS_RETRY_DELAY_S)
                await _settle(message.nack(requeue=True))
                return
        await _settle(message.ack() if parked else message.reject(requeue=False))


async def _settle(op: object) -> None:
    """Ack/nack may fail if the channel died meanwhile; the broker then redelivers, which is safe."""
    try:
        await op  # type: ignore[misc]
    except (aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError) as e:
        log.warning("could not settle a message (%s); it will be redelivered", e)


__all__ = ["Request", "Worker"]
