"""Broker and Redis restarts under light load: no agentpool process is restarted.

The servers restarted here are the suite's own (tests/servers.py: a throwaway redis-server with
the shipped deploy/redis/redis.conf, a throwaway RabbitMQ node), never the machine's.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import pytest

from agentpool.shared.errors import AgentPoolError
from agentpool.shared.messages import MESSAGE_DECODER
from agentpool.shared.settings import Settings
from tests.conftest import System, running_gateway, wait_until
from tests.servers import RabbitNode, RedisServer

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

THREADS = 7


@pytest.fixture
def settings(own_settings: Settings) -> Settings:
    return own_settings


class Load:
    """One request at a time on a few threads, recording how each ended."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.outcomes: Counter[str] = Counter()
        self.answered: dict[str, list[str]] = collections.defaultdict(list)  # thread -> request ids
        self.stop = asyncio.Event()

    async def run(self) -> None:
        """Errors must be clear ones, never hangs."""
        i = 0
        while not self.stop.is_set():
            i += 1
            thread = _thread(i)
            try:
                reply = await asyncio.wait_for(self.system.client.ask("p", f"load {i}", thread_id=thread), 30)
                self.outcomes["ok" if reply.content else "empty"] += 1
                self.answered[thread].append(reply.request_id)
            except AgentPoolError as e:
                self.outcomes[e.error_code] += 1
                await asyncio.sleep(0.2)

    async def threads(self) -> dict[str, list[bytes]]:
        """Every load thread's stored turns."""
        r, names = self.system.client.redis, self.system.client.names
        return {t: await r.lrange(names.thread("default", t), 0, -1) for t in map(_thread, range(THREADS))}


def _thread(i: int) -> str:
    return f"load-{i % THREADS}"


async def _restart_under_load(
    load: Load,
    stop: Callable[[], object],
    start: Callable[[], object],
    ready_key: str,
    before_stop: Callable[[], Awaitable[object]] | None = None,
) -> None:
    system = load.system
    task = asyncio.create_task(load.run())
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await wait_until(lambda: load.outcomes["ok"] >= 10, 30, "load running")
        if before_stop is not None:
            await before_stop()
        await asyncio.to_thread(stop)
        try:

            async def not_ready() -> bool:
                r = await http.get("/readyz")
                return r.status_code == 503 and r.json()["dependencies"][ready_key] is False

            # /readyz says not-ready while the dependency is down
            await wait_until(not_ready, 15, f"/readyz to report {ready_key} down")
        finally:
            await asyncio.to_thread(start)
        t_back = time.monotonic()

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await wait_until(ready, 60, "readyz after the restart")
        before = load.outcomes["ok"]
        await wait_until(lambda: load.outcomes["ok"] >= before + 10, 60, "requests served after the restart")
        print(
            f"\nback to serving {time.monotonic() - t_back:.1f}s after the restart; "
            f"outcomes {dict(load.outcomes)}"
        )
        # New requests succeed through the gateway too, with no process restarted
        r = await http.post("/v1/ask/p", json={"content": "after restart"})
        assert r.status_code == 200, r.text
    load.stop.set()
    await asyncio.wait_for(task, 40)
    # Every request ended: answered, or a clear error code (never a hang or a bare exception)
    assert set(load.outcomes) <= {
        "ok",
        "BROKER_UNAVAILABLE",
        "REDIS_UNAVAILABLE",
        "REQUEST_FAILED",
        "PROVIDER_UNAVAILABLE",
        "INTERNAL",
        "REPLY_TIMEOUT",
        "QUEUE_TIMEOUT",
    }, load.outcomes


async def test_rabbitmq_restart(make_system, own_rabbit: RabbitNode) -> None:
    system: System = await make_system(replicas=2, ttft_ms=5, tokens_per_s=500, reply_tokens=10)
    load = Load(system)
    await _restart_under_load(load, own_rabbit.stop_app, own_rabbit.start_app, "rabbitmq")
    assert load.outcomes["ok"] >= 20


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
async def test_redis_restart_keeps_every_turn(make_system, own_redis: RedisServer, how: str) -> None:
    system: System = await make_system(replicas=2, ttft_ms=5, tokens_per_s=500, reply_tokens=10)
    load = Load(system)
    before: dict[str, list[bytes]] = {}

    async def snapshot() -> None:
        before.update(await load.threads())

    # Given threads written to under light load, when Redis stops (SHUTDOWN, or SIGKILL) and
    # starts again on its data directory (the shipped config: AOF, appendfsync everysec)
    stop = own_redis.stop if how == "shutdown" else own_redis.kill
    await _restart_under_load(load, stop, own_redis.start, "redis", before_stop=snapshot)
    assert load.outcomes["ok"] >= 20
    after = await load.threads()
    # Then every turn written before the restart is still there, in order
    assert sum(map(len, before.values())) >= 20
    for thread, turns in before.items():
        assert after[thread][: len(turns)] == turns, f"thread {thread}: turns lost in the restart"
    # and each answered request's two turns are in its thread once, in the order of the answers
    for thread, rids in load.answered.items():
        mine = set(rids)
        stored = [t.request_id for t in map(MESSAGE_DECODER.decode, after[thread]) if t.request_id in mine]
        assert stored == [rid for rid in rids for _ in (0, 1)], f"thread {thread}"
    print(f"{how}: {sum(map(len, before.values()))} thread entries before the restart, all kept")


async def test_first_command_after_a_redis_restart_succeeds(own_redis: RedisServer) -> None:
    from agentpool.broker.redis_conn import connect

    # Given a pool whose connections were all used just now (so none is due a health-check PING)
    r = connect(own_redis.url, max_connections=4)
    try:
        await asyncio.gather(*(r.set(f"k{i}", i) for i in range(8)))
        # When Redis restarts, and the next commands come well within the 5 s health-check interval
        await asyncio.to_thread(own_redis.stop)
        await asyncio.to_thread(own_redis.start)
        # Then each runs on a new connection instead of failing on its dead one
        got = await asyncio.gather(*(r.get(f"k{i}") for i in range(8)))
        assert got == [str(i).encode() for i in range(8)]
    finally:
        await r.aclose()
