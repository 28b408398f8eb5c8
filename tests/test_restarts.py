"""Broker and Redis restarts under light load: no agentpool process is restarted.

These tests stop and start the real local servers, so they run only where the server binaries
are on this machine (as in CI) and never against a remote or containerised service.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections import Counter

import httpx
import pytest

from agentpool.shared.errors import AgentPoolError
from tests.conftest import System, running_gateway, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
]


def _local(settings_url: str, binary: str) -> None:
    if ("127.0.0.1" not in settings_url and "localhost" not in settings_url) or not shutil.which(binary):
        if os.environ.get("CI"):
            pytest.fail(f"{binary} not available to restart")
        pytest.skip(f"needs a local {binary} to restart")


async def light_load(system: System, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    """One request at a time, recording how each ended; errors must be clear, never hangs."""
    i = 0
    while not stop.is_set():
        i += 1
        try:
            reply = await asyncio.wait_for(system.client.ask("p", f"load {i}", thread_id=f"load-{i % 7}"), 30)
            outcomes["ok" if reply.content else "empty"] += 1
        except AgentPoolError as e:
            outcomes[e.error_code] += 1
            await asyncio.sleep(0.2)


async def _restart_under_load(system: System, restart: list[list[str]], ready_key: str) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    load = asyncio.create_task(light_load(system, stop, outcomes))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await wait_until(lambda: outcomes["ok"] >= 10, 30, "load running")
        stop_cmd, start_cmd = restart
        await asyncio.to_thread(subprocess.run, stop_cmd, capture_output=True, timeout=120)
        try:

            async def not_ready() -> bool:
                r = await http.get("/readyz")
                return r.status_code == 503 and r.json()["dependencies"][ready_key] is False

            # /readyz says not-ready while the dependency is down
            await wait_until(not_ready, 15, f"/readyz to report {ready_key} down")
        finally:
            await asyncio.to_thread(subprocess.run, start_cmd, check=True, capture_output=True, timeout=120)
        t_back = time.monotonic()

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await wait_until(ready, 60, "readyz after the restart")
        before = outcomes["ok"]
        await wait_until(lambda: outcomes["ok"] >= before + 10, 60, "requests succeeding after the restart")
        print(
            f"\nback to serving {time.monotonic() - t_back:.1f}s after the restart; outcomes {dict(outcomes)}"
        )
        # New requests succeed through the gateway too, with no process restarted
        r = await http.post("/v1/ask/p", json={"content": "after restart"})
        assert r.status_code == 200, r.text
    stop.set()
    await asyncio.wait_for(load, 40)
    # Every request ended: answered, or a clear error code (never a hang or a bare exception)
    assert set(outcomes) <= {
        "ok",
        "BROKER_UNAVAILABLE",
        "REDIS_UNAVAILABLE",
        "REQUEST_FAILED",
        "PROVIDER_UNAVAILABLE",
        "INTERNAL",
        "REPLY_TIMEOUT",
        "QUEUE_TIMEOUT",
    }, outcomes
    return outcomes


async def test_rabbitmq_restart(make_system) -> None:
    system: System = await make_system(replicas=2, ttft_ms=5, tokens_per_s=500, reply_tokens=10)
    _local(system.settings.amqp_url, "rabbitmqctl")
    outcomes = await _restart_under_load(
        system, [["rabbitmqctl", "stop_app"], ["rabbitmqctl", "start_app"]], "rabbitmq"
    )
    assert outcomes["ok"] >= 20


async def test_redis_restart(make_system) -> None:
    system: System = await make_system(replicas=2, ttft_ms=5, tokens_per_s=500, reply_tokens=10)
    _local(system.settings.redis_url, "redis-server")
    outcomes = await _restart_under_load(
        system, [["redis-cli", "-p", "6379", "shutdown", "nosave"], REDIS_START], "redis"
    )
    assert outcomes["ok"] >= 20
