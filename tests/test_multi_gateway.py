"""Several gateway processes agree on each thread's replica without talking to each other."""

from __future__ import annotations

import asyncio
import collections
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLE, System, free_port, make_config, subprocess_env, wait_until

pytestmark = pytest.mark.timeout(120)

PARAMS = dict(
    pool="p",
    replicas=3,
    concurrency=4,
    sticky_depth=3,
    max_depth=10,
    ttft_ms=0,
    tokens_per_s=0,
    reply_tokens=8,
    rescue_after_s=5,
    max_attempts=3,
)


async def test_two_gateway_processes_keep_threads_sticky(make_system, tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(EXAMPLE.format(**PARAMS))
    system: System = await make_system(make_config(**{k: v for k, v in PARAMS.items() if k != "pool"}))
    env = {**subprocess_env(system.settings, path), "AGENTPOOL_LOG_LEVEL": "WARNING"}
    ports = [free_port(), free_port()]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentpool", "gateway", "--host", "127.0.0.1", "--port", str(p), env=env
        )
        for p in ports
    ]
    try:
        async with httpx.AsyncClient(timeout=30) as http:

            async def up() -> bool:
                try:
                    codes = [(await http.get(f"http://127.0.0.1:{p}/readyz")).status_code for p in ports]
                    return codes == [200, 200]
                except httpx.TransportError:
                    return False

            # Ready means the lifespan finished, and it loads membership before it does: both
            # gateways see the 3 replicas that make_system registered before they started.
            await wait_until(up, 30, "both gateways ready")
            placed: dict[str, list[str]] = collections.defaultdict(list)

            async def lane(threads: list[str]) -> None:
                for k in range(5):
                    for t in threads:
                        port = ports[(k + hash(t)) % 2]  # alternate gateways message by message
                        r = await http.post(
                            f"http://127.0.0.1:{port}/v1/ask/p", json={"content": f"m{k}", "thread_id": t}
                        )
                        assert r.status_code == 200, r.text
                        placed[t].append(r.json()["agent_id"])

            threads = [f"st-{i}" for i in range(200)]
            # When 200 threads x 5 messages go through two gateway processes at low load
            await asyncio.gather(*(lane(threads[i::4]) for i in range(4)))
        total = sum(len(v) for v in placed.values())
        on_majority = sum(collections.Counter(v).most_common(1)[0][1] for v in placed.values())
        ratio = on_majority / total
        print(f"\nstickiness across 2 gateways: {on_majority}/{total} = {ratio:.4f}")
        # Then each thread's messages land on one replica >= 99% of the time
        assert total == 1000
        assert ratio >= 0.99
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            await asyncio.wait_for(p.wait(), 20)
