"""A/B between deployments: the split over new threads, the pool status's per-deployment figures
(requests, measured share, latency, errors, tokens) and metrics, a thread kept on its deployment
while replicas come and go, and the deployment named in every kind of answer."""

from __future__ import annotations

import asyncio
import collections
import json
import math
from itertools import count

import httpx
import pytest
import redis.asyncio as aredis
from prometheus_client import REGISTRY

from agentpool.broker.history import LATENCY_BOUNDS_MS, RECENT_S, Recorder, latency_index, read
from agentpool.shared.config import Config, parse_config
from agentpool.shared.messages import End, Usage
from agentpool.status import render
from tests.api_helpers import receiver
from tests.conftest import RUN, System, running_gateway, wait_until

pytestmark = pytest.mark.timeout(60)

_pools = count(1)
AB = """
[providers.fa]
kind = "fake"
reply_tokens = 12

[providers.fb]
kind = "fake"
reply_tokens = 20

[agent_types.a]
provider = "fa"
model = "fake-a"
system_prompt = "You are arm A."

[agent_types.b]
provider = "fb"
model = "fake-b"
system_prompt = "You are arm B, with a longer system prompt than arm A has."

[webhooks]
allow_hosts = ["127.0.0.1"]
retry_base_s = 0.2
max_attempts = 3
timeout_s = 2

[pools.{pool}]
limits = {{ concurrency = 8, sticky_depth = 24, max_depth = 48 }}

[[pools.{pool}.deployments]]
name = "big"
agent_type = "a"
replicas = {big}
weight = 90

[[pools.{pool}.deployments]]
name = "small"
agent_type = "b"
replicas = {small}
weight = 10
"""


def ab_config(big: int = 4, small: int = 2) -> tuple[str, Config]:
    """A pool (named uniquely: the process's metrics registry outlives tests) split 90/10."""
    pool = f"ab{RUN}-{next(_pools)}"
    return pool, parse_config(AB.format(pool=pool, big=big, small=small), "ab.toml")


def percentile_ms(latencies_ms: list[float], q: float) -> float:
    """The pool status's percentile: the upper bound of the latency bucket holding the ``q`` quantile."""
    idx = sorted(latency_index(ms) for ms in latencies_ms)
    return LATENCY_BOUNDS_MS[idx[math.ceil(q * len(idx)) - 1]]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_90_10_split_over_2000_new_threads_and_the_status_counts_it(make_system) -> None:
    pool, config = ab_config()
    system: System = await make_system(config)
    client = system.client
    # When 2,000 asks, each on a new thread, run 64 at a time
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> End:
        async with gate:
            return await client.ask(pool, f"question {i}")

    answers = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(2000))), 40)
    by_dep: dict[str, list[End]] = collections.defaultdict(list)
    for end in answers:
        assert end.agent_id.startswith(f"{pool}-{end.deployment}-"), end  # named by the replica's own
        by_dep[end.deployment].append(end)
    assert set(by_dep) == {"big", "small"} and len({e.thread_id for e in answers}) == 2000
    share = len(by_dep["big"]) / 2000
    print(f"\nA/B 90/10 over 2,000 new threads: big {share:.2%}, small {len(by_dep['small']) / 2000:.2%}")
    # Then the 90 arm answered within 3 points of 90 %
    assert abs(share - 0.90) <= 0.03, share

    # And GET /v1/pools/{pool} reports per deployment exactly what the client saw
    async with running_gateway(system.settings, config) as url, httpx.AsyncClient(base_url=url) as http:

        async def status() -> dict[str, dict[str, object]]:
            r = await http.get(f"/v1/pools/{pool}")
            assert r.status_code == 200, r.text
            return {d["name"]: d for d in r.json()["deployments"]}

        async def flushed() -> bool:  # workers flush their counts once per heartbeat
            deps = await status()
            return all(deps[d]["recent"]["requests"] == len(by_dep[d]) for d in deps)  # type: ignore[index]

        await wait_until(flushed, 15, "the per-deployment request counts in the pool status")
        deps = await status()
        pools = (await http.get("/v1/pools")).json()["pools"]
    assert all("recent" not in d for d in pools[0]["deployments"])  # the list stays cheap
    for name, weight in (("big", 90), ("small", 10)):
        ends, d = by_dep[name], deps[name]
        assert d["weight"] == weight and d["share"] == weight / 100  # configured, as before
        assert d["recent"] == {
            "window_s": RECENT_S,
            "requests": len(ends),
            "share": round(len(ends) / 2000, 4),
            "errors": 0,
            "error_rate": 0.0,
            "p50_ms": percentile_ms([e.timings.total_ms for e in ends], 0.50),
            "p99_ms": percentile_ms([e.timings.total_ms for e in ends], 0.99),
            "input_tokens": sum(e.usage.input_tokens for e in ends),
            "output_tokens": sum(e.usage.output_tokens for e in ends),
        }, name
        # And the worker metrics carry the deployment: requests and tokens per arm
        assert metric("agentpool_requests_total", pool=pool, deployment=name, outcome="end") == len(ends)
        assert metric("agentpool_request_duration_seconds_count", pool=pool, deployment=name) == len(ends)
        model = "fake-a" if name == "big" else "fake-b"
        labels = {"pool": pool, "deployment": name, "provider": "fake", "model": model}
        assert metric("agentpool_output_tokens_total", **labels) == sum(e.usage.output_tokens for e in ends)
        assert metric("agentpool_input_tokens_total", **labels) == sum(e.usage.input_tokens for e in ends)
    assert {e.usage.output_tokens for e in by_dep["big"]} == {12}
    assert {e.usage.output_tokens for e in by_dep["small"]} == {20}

    # And `agentpool status POOL` prints the measured share next to the configured one
    out = await render(system.settings, config, pool)
    print(out)
    assert "MEASURED" in out and f"{len(by_dep['big']) / 2000:.1%}" in out, out


async def test_a_thread_stays_on_its_deployment_while_replicas_come_and_go(make_system) -> None:
    pool, config = ab_config(big=3, small=3)
    system: System = await make_system(config)
    client = system.client
    # Given 100 threads, each answered once, and one of them answered by the 10 arm
    first = {f"t-{i}": await client.ask(pool, "hello", thread_id=f"t-{i}") for i in range(100)}
    deployment_of = {t: e.deployment for t, e in first.items()}
    assert set(deployment_of.values()) == {"big", "small"}
    thread, end = next((t, e) for t, e in first.items() if e.deployment == "small")

    async def asks_stay(turn: int) -> None:
        again = await client.ask(pool, "and now?", thread_id=thread)
        assert again.deployment == "small", again
        assert again.content.startswith(f"[{2 * turn} earlier]")  # the thread's history went along
        for t, dep in deployment_of.items():
            if t != thread:
                assert (await client.ask(pool, "again", thread_id=t)).deployment == dep, t

    # When the replica that answered it stops, Then the thread stays on its deployment
    await system.stop_worker(end.agent_id)
    await system.wait_members(pool)
    await asks_stay(1)
    assert end.agent_id not in {r.id for r in client.router.members(pool)}
    # When the other deployment gains a replica and loses one
    await system.start_worker(pool, "big", 4)
    await system.stop_worker(f"{pool}-big-1")
    await system.wait_members(pool)
    await asks_stay(2)
    # When its own deployment gains a replica
    await system.start_worker(pool, "small", 4)
    await system.wait_members(pool)
    await asks_stay(3)


async def test_sse_end_json_and_webhook_name_the_deployment(make_system) -> None:
    pool, config = ab_config(big=1, small=1)
    system: System = await make_system(config)
    async with (
        receiver() as rec,
        running_gateway(system.settings, config) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        # Threads of both arms: each answer names the deployment of the agent that gave it
        seen: set[str] = set()
        for i in range(60):
            if seen == {"big", "small"}:
                break
            r = await http.post(f"/v1/ask/{pool}", json={"content": "hi", "thread_id": f"h-{i}"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["agent_id"] == f"{pool}-{body['deployment']}-1", body
            seen.add(body["deployment"])
        assert seen == {"big", "small"}
        # The SSE end event
        r = await http.post(f"/v1/ask/{pool}", json={"content": "stream it", "stream": True})
        assert r.status_code == 200, r.text
        ends = [ln[6:] for ln in r.text.splitlines() if ln.startswith('data: {"type":"end"')]
        assert len(ends) == 1, r.text
        end = json.loads(ends[0])
        assert end["deployment"] in {"big", "small"} and end["agent_id"] == f"{pool}-{end['deployment']}-1"
        # The webhook payload
        r = await http.post(f"/v1/ask/{pool}", json={"content": "hook me", "webhook_url": rec.url})
        assert r.status_code == 202, r.text
        await rec.wait_for(1)
        payload = json.loads(rec.deliveries[0].body)
        assert payload["status"] == "completed", payload
        assert payload["agent_id"] == f"{pool}-{payload['deployment']}-1", payload


async def test_per_deployment_history_counts_errors_latency_and_tokens(make_system) -> None:
    pool, config = ab_config()
    system: System = await make_system(config, start=False)
    client = system.client
    redis = aredis.Redis.from_url(system.settings.redis_url)
    try:
        # Given what two processes recorded: 9 requests of big (1 failed), 1 of small
        one, two = Recorder(redis, client.names), Recorder(redis, client.names)
        for i in range(9):
            rec = one if i % 2 else two
            rec.ended(pool, "big", 10.0 * (i + 1), error=i == 8, usage=Usage(input_tokens=5, output_tokens=7))
        two.ended(pool, "small", 500.0, error=False, usage=Usage(input_tokens=3, output_tokens=2))
        two.refused(pool, 503)
        await one.flush()
        await two.flush()
        # Then the pool status sums them per deployment
        status = await client.fleet.status(pool, traffic=True)
        big, small = (d.recent for d in status.deployments)
        assert big is not None and small is not None
        assert (big.requests, big.errors, big.error_rate, big.share) == (9, 1, round(1 / 9, 4), 0.9)
        assert (big.input_tokens, big.output_tokens) == (45, 63)
        assert big.p50_ms == percentile_ms([10.0 * (i + 1) for i in range(9)], 0.5) and big.p50_ms >= 50
        assert big.p99_ms == LATENCY_BOUNDS_MS[latency_index(90.0)]
        assert (small.requests, small.share, small.p50_ms) == (1, 0.1, LATENCY_BOUNDS_MS[latency_index(500)])
        # And the pool's own history (the dashboard's) is as before: all of them together
        points = (await read(redis, client.names, [pool], 0))[pool]
        assert sum(p.r503 for p in points) == 1 and sum(p.tokens for p in points) == 45 + 63 + 5
        assert max(p.p99_ms for p in points) == LATENCY_BOUNDS_MS[latency_index(500)]
        # And without traffic asked for, the status reads no history
        assert all(d.recent is None for d in (await client.fleet.status(pool)).deployments)
    finally:
        await redis.aclose()
