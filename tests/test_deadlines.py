"""Deadlines and cancellation: QUEUE_TIMEOUT when no agent starts in time; a client that leaves
mid-stream stops the generation."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import System, running_gateway, wait_until

pytestmark = pytest.mark.timeout(60)


async def test_queue_timeout_answers_504_and_the_agent_skips_it(make_system) -> None:
    # Given one replica busy for ~2 s with one request
    system: System = await make_system(
        replicas=1, concurrency=1, ttft_ms=2000, rescue_after_s=60, drain_timeout_s=1
    )
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        busy = asyncio.create_task(http.post("/v1/ask/p", json={"content": "slow", "thread_id": "busy"}))
        await wait_until(
            lambda: system.workers["p-main-1"].info.in_flight or len(system.workers["p-main-1"]._tasks),
            10,
            "the first request in flight",
        )
        # When a second request may wait only 0.3 s for an agent
        t0 = time.monotonic()
        r = await http.post("/v1/ask/p", json={"content": "hurry", "thread_id": "late", "max_wait_s": 0.3})
        # Then it is answered 504 QUEUE_TIMEOUT quickly, not after the busy one finished
        assert r.status_code == 504, r.text
        assert r.json()["error_code"] == "QUEUE_TIMEOUT"
        assert time.monotonic() - t0 < 1.9
        assert (await busy).status_code == 200
        # and the agent skipped it when it got to it: no turn was written for the late thread
        await wait_until(
            lambda: system.workers["p-main-1"].info.processed >= 1 and not system.workers["p-main-1"]._tasks,
            10,
            "the worker to get past the late request",
        )
        late = await system.client.redis.lrange(system.client.names.thread("default", "late"), 0, -1)
        assert late == []


async def test_client_disconnect_cancels_generation(make_system) -> None:
    # Given a slow stream: 100 tokens at 20 tokens/s (5 s in all)
    system: System = await make_system(replicas=1, tokens_per_s=20, reply_tokens=100)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        chunks = 0
        rid = ""
        async with http.stream("POST", "/v1/ask/p", json={"content": "long story", "stream": True}) as r:
            rid = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if line.startswith("event: chunk"):
                    chunks += 1
                if chunks == 3:
                    break  # When the client goes away after 3 chunks
        t_left = time.monotonic()
        # Then the worker stops generating: the stream ends with CANCELLED, long before 5 s
        key = system.client.names.reply(rid)

        async def cancelled() -> bool:
            entries = await system.client.redis.xrange(key)
            return any(f[b"t"] == b"error" and b"CANCELLED" in f[b"d"] for _, f in entries)

        await wait_until(cancelled, 5, "a CANCELLED error event")
        assert time.monotonic() - t_left < 2.5
        entries = await system.client.redis.xrange(key)
        assert sum(f[b"t"] == b"chunk" for _, f in entries) < 60
        assert not any(f[b"t"] == b"end" for _, f in entries)
        # and no half answer was written into any thread
        assert await system.client.redis.keys(system.client.names.thread("default", "*")) == []
