"""Queue lifetimes: a replica deletes its queue when it drains (never losing what is queued in it),
a publish to a deleted queue goes to the next replica, and per-tenant templates declare no queues."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest

from agentpool.broker.amqp import QueueGone
from agentpool.broker.client import AgentPoolClient, Ticket, new_id
from agentpool.broker.streams import Subscription
from agentpool.shared.errors import Unavailable
from agentpool.shared.messages import REQUEST_ENCODER, End, Request, Start
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings
from agentpool.workers.runtime import ROUTER_GRACE_S
from tests.conftest import System, make_config, wait_until
from tests.fleet_support import delete_pool_objects

pytestmark = pytest.mark.timeout(90)

VARS = {"PRODUCT": "agentpool"}  # the test agent type's system prompt uses {PRODUCT}


class Probe:
    """Does a queue or exchange exist? A passive declare on a fresh raw channel per question (a
    failed passive declare closes its channel; a robust channel would answer from its cache)."""

    def __init__(self, conn: aio_pika.abc.AbstractConnection) -> None:
        self.conn = conn

    async def _exists(self, kind: str, name: str) -> bool:
        ch = await self.conn.channel()
        try:
            raw = await ch.get_underlay_channel()
            if kind == "queue":
                await raw.queue_declare(name, passive=True)
            else:
                await raw.exchange_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not ch.is_closed:
                await ch.close()
        return True

    async def queue(self, name: str) -> bool:
        return await self._exists("queue", name)

    async def exchange(self, name: str) -> bool:
        return await self._exists("exchange", name)


@contextlib.asynccontextmanager
async def probe(settings: Settings) -> AsyncIterator[Probe]:
    conn = await aio_pika.connect(settings.amqp_url)
    async with conn:
        yield Probe(conn)


async def publish_to_replica(
    client: AgentPoolClient, replica: str, content: str
) -> tuple[Subscription, Ticket]:
    """Queue a request on one replica's queue as the router would (a router whose membership is a
    moment old may still do so for a replica that began draining)."""
    now = time.time()
    req = Request(
        request_id=new_id(),
        pool="p",
        tenant="default",
        thread_id=new_id(),
        content=content,
        created_at=now,
        context_variables=VARS,
        start_by=now + 30,
        replica=replica,
        tier="sticky",
    )
    sub = client.reader.subscribe(client.names.reply(req.request_id))
    await client.amqp.publish(
        client.names.replica_queue(replica),
        REQUEST_ENCODER.encode(req),
        message_id=req.request_id,
        headers={"thread_id": req.thread_id, "tenant": req.tenant},
    )
    return sub, Ticket(req.request_id, req.thread_id, "p", "", "sticky", req.start_by)


async def test_a_replica_that_stops_deletes_its_empty_queue_at_once(make_system) -> None:
    # Given two idle replicas, and a TTL long enough that any wait for it would show
    system: System = await make_system(replicas=2, rescue_after_s=5)
    names = Names(system.settings.namespace)
    async with probe(system.settings) as exists:
        assert await exists.queue(names.replica_queue("p-main-1"))
        # When one stops gracefully
        t0 = time.monotonic()
        await system.stop_worker("p-main-1")
        took = time.monotonic() - t0
        # Then its queue is gone once routers have seen it drain (ROUTER_GRACE_S), without waiting
        # for the TTL; the other replica's queue stays
        assert not await exists.queue(names.replica_queue("p-main-1"))
        assert await exists.queue(names.replica_queue("p-main-2"))
        assert await exists.queue(names.pool_queue("p"))
        assert took < ROUTER_GRACE_S + 1.5 < 5, f"stopping an idle replica took {took:.2f}s"
        await system.client.refresh_membership()
        reply = await system.client.ask("p", "still there?", thread_id="q-1", context_variables=VARS)
        assert reply.agent_id == "p-main-2"


async def test_a_request_queued_on_a_draining_replica_is_answered_then_its_queue_goes(make_system) -> None:
    # Given two replicas, one of them busy with a slow answer (~1.3 s)
    system: System = await make_system(
        replicas=2, rescue_after_s=1, ttft_ms=300, tokens_per_s=20, reply_tokens=20
    )
    client = system.client
    names = Names(system.settings.namespace)
    w1 = system.workers["p-main-1"]
    busy_sub, busy = await publish_to_replica(client, "p-main-1", "a long one")
    busy_events = client.stream_raw(busy, sub=busy_sub)
    _, kind, _ = await anext(busy_events)
    assert kind == b"start"

    # When it is told to stop, and once it no longer consumes, a request still lands in its queue
    stopping = asyncio.create_task(system.stop_worker("p-main-1"))
    await wait_until(lambda: w1.info.status == "draining" and not w1._consumers, 5, "p-main-1 draining")
    queued_sub, queued = await publish_to_replica(client, "p-main-1", "queued behind the drain")

    async with probe(system.settings) as exists:
        # Then the answer in flight completes on the draining replica
        rest = [entry async for entry in busy_events]
        assert rest[-1][1] == b"end"
        # And the queued request is answered by the other replica (it dead-letters to the pool's
        # shared queue after rescue_after_s) before the queue is deleted: nothing is lost
        end = await asyncio.wait_for(client.result(queued, sub=queued_sub), 15)
        assert isinstance(end, End) and end.agent_id == "p-main-2"
        await asyncio.wait_for(stopping, 15)
        assert not await exists.queue(names.replica_queue("p-main-1"))
        assert await exists.queue(names.replica_queue("p-main-2"))


async def test_publishing_to_a_deleted_replica_queue_goes_to_the_next_replica(
    make_system, monkeypatch: pytest.MonkeyPatch
) -> None:
    system: System = await make_system(replicas=2)
    client = system.client
    names = Names(system.settings.namespace)
    await system.stop_worker("p-main-1")  # drained: its queue is deleted
    async with probe(system.settings) as exists:
        assert not await exists.queue(names.replica_queue("p-main-1"))

    # A publish to it comes back unroutable: QueueGone, still an Unavailable for other callers
    with pytest.raises(QueueGone) as gone:
        await client.amqp.publish(names.replica_queue("p-main-1"), b"x", message_id=new_id())
    assert isinstance(gone.value, Unavailable)

    # A router that still plans the gone replica first skips to the next one in the plan
    monkeypatch.setattr(client.router, "plan", lambda *_: [("p-main-1", "sticky"), ("p-main-2", "spill")])
    ticket = await client.submit("p", "who answers?", thread_id="gone-1", context_variables=VARS)
    assert (ticket.replica, ticket.tier) == ("p-main-2", "spill")
    assert (await client.result(ticket)).agent_id == "p-main-2"

    # And one whose whole plan is gone parks the request on the pool's shared queue
    monkeypatch.setattr(client.router, "plan", lambda *_: [("p-main-1", "sticky")])
    stream = client.stream("p", "anyone?", thread_id="gone-2", context_variables=VARS)
    events = [e async for e in stream]
    assert isinstance(events[0], Start) and isinstance(events[-1], End), events
    assert events[-1].agent_id == "p-main-2"


TENANTS = """
[pools.t]
per_tenant = true
limits = { concurrency = 2, sticky_depth = 3, max_depth = 10, rescue_after_s = 1 }

[[pools.t.deployments]]
name = "main"
agent_type = "echo"
replicas = 1
"""


async def test_a_per_tenant_template_declares_no_queues_its_tenant_pools_do(make_system) -> None:
    # Given a static pool p and a per-tenant template t, and a client started on them
    system: System = await make_system(make_config(replicas=0, extra=TENANTS), start=False)
    names = Names(system.settings.namespace)
    try:
        async with probe(system.settings) as exists:
            # Then the static pool's queues and exchange are declared, the template's are not
            assert await exists.queue(names.pool_queue("p"))
            assert await exists.queue(names.parking_queue("p"))
            assert await exists.exchange(names.pool_exchange("p"))
            assert not await exists.queue(names.pool_queue("t"))
            assert not await exists.queue(names.parking_queue("t"))
            assert not await exists.exchange(names.pool_exchange("t"))
            # When a tenant asks for the first time (no replica runs: the request is queued)
            ticket = await system.client.submit(
                "t", "hi", tenant="a", thread_id="a-1", context_variables=VARS
            )
            assert (ticket.pool, ticket.tier) == ("t--a", "queued")
            # Then the tenant's pool has its queues and exchange, and the template still none
            assert await exists.queue(names.pool_queue("t--a"))
            assert await exists.queue(names.parking_queue("t--a"))
            assert await exists.exchange(names.pool_exchange("t--a"))
            assert not await exists.queue(names.pool_queue("t"))
    finally:
        await delete_pool_objects(system.settings, ["t--a"], ["main"])
