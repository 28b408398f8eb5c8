"""Routing under load: sticky, spill, overflow, then 503 — and the broker's bound holds."""

from __future__ import annotations

import collections

import httpx
import pytest

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.router import rendezvous_order
from agentpool.shared.errors import Unavailable
from tests.conftest import System, running_gateway

pytestmark = pytest.mark.timeout(90)

# Three replicas that each hold one request "forever" (60 s to the first token).
FLOOD = dict(
    replicas=3,
    concurrency=1,
    sticky_depth=3,
    max_depth=10,
    ttft_ms=60_000,
    rescue_after_s=120,
    drain_timeout_s=1,
)


async def test_flood_walks_every_tier_then_rejects(make_system) -> None:
    system: System = await make_system(**FLOOD)
    client = system.client
    ids = sorted(system.workers)
    order = rendezvous_order("flood", [(rid, 1.0) for rid in ids])
    placed: list[tuple[str, str]] = []
    rejected: list[Unavailable] = []
    subs = []
    # When one thread sends 40 requests that all stay in flight
    for i in range(40):
        try:
            sub, ticket = await client.submit_subscribed("p", f"message {i}", thread_id="flood")
        except Unavailable as e:
            rejected.append(e)
            continue
        subs.append(sub)
        placed.append((ticket.tier, ticket.replica))
    # Then: 3 on the sticky replica, 3 + 3 spill in the thread's own hash order,
    assert placed[:3] == [("sticky", order[0])] * 3
    assert placed[3:9] == [("spill", order[1])] * 3 + [("spill", order[2])] * 3
    # then overflow until every replica holds max_depth (1 in flight + 9 queued), then 503s.
    assert [t for t, _ in placed[9:]] == ["overflow"] * 21
    assert collections.Counter(r for _, r in placed) == {rid: 10 for rid in ids}
    assert len(rejected) == 10
    assert all(e.error_code == "POOL_SATURATED" and e.status == 503 and e.retry_after_s for e in rejected)

    # A second gateway that has published nothing yet (its own, empty accounting) cannot push
    # more in: the broker's x-max-length nacks every publish, so the router answers 503 too.
    other = AgentPoolClient(system.settings, system.config)
    await other.start()
    try:
        for i in range(5):
            with pytest.raises(Unavailable) as e:
                await other.submit("p", f"extra {i}", thread_id=f"other-{i}")
            assert e.value.error_code == "POOL_SATURATED"
    finally:
        await other.aclose()

    # Over HTTP the same answer is a 503 with Retry-After and the error body.
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        r = await http.post("/v1/ask/p", json={"content": "one more"})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error_code"] == "POOL_SATURATED"

    # Nothing beyond the bound reached a queue: each replica queue holds exactly 9 ready.
    for rid in ids:
        assert await system.workers[rid]._ready_count() == 9
    for sub in subs:
        sub.close()
