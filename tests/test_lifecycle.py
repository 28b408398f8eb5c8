"""Worker processes: graceful SIGTERM drain, second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from agentpool.shared.messages import Start
from tests.conftest import PYTHON, System, make_config, subprocess_env, wait_until

pytestmark = pytest.mark.timeout(90)

SLOW = dict(replicas=1, ttft_ms=300, tokens_per_s=20, reply_tokens=20)  # ~1.3 s per answer


async def spawn_worker(system: System, tmp_path: Path, n: int = 1) -> asyncio.subprocess.Process:
    cfg = tmp_path / "pools.toml"
    if not cfg.exists():
        from tests.conftest import EXAMPLE

        cfg.write_text(
            EXAMPLE.format(
                pool="p",
                concurrency=4,
                sticky_depth=3,
                max_depth=10,
                rescue_after_s=5,
                max_attempts=3,
                **SLOW,
            )
        )
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "agentpool",
        "worker",
        "--pool",
        "p",
        "--deployment",
        "main",
        "--replica",
        str(n),
        env=subprocess_env(system.settings, cfg),
    )

    async def up() -> bool:
        await system.client.refresh_membership()
        return any(r.id == f"p-main-{n}" for r in system.client.router.members("p"))

    await wait_until(up, 20, "worker process ready")
    return proc


async def test_request_in_flight_at_sigterm_completes(make_system, tmp_path: Path) -> None:
    system: System = await make_system(make_config(**SLOW), start=False)
    proc = await spawn_worker(system, tmp_path)
    try:
        stream = system.client.stream("p", "take your time", thread_id="drain-1")
        first = await anext(stream)
        assert isinstance(first, Start)
        # When SIGTERM arrives while the request is in flight
        proc.send_signal(signal.SIGTERM)
        # Then the answer still completes, and the process exits cleanly afterwards
        events = [e async for e in stream]
        assert type(events[-1]).__name__ == "End", events[-1]
        assert events[-1].content.count(" ") >= 19
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await system.client.refresh_membership()
        assert system.client.router.members("p") == []  # deregistered
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_second_signal_exits_at_once(make_system, tmp_path: Path) -> None:
    system: System = await make_system(make_config(**SLOW), start=False)
    proc = await spawn_worker(system, tmp_path)
    try:
        stream = system.client.stream("p", "long one", thread_id="drain-2")
        assert isinstance(await anext(stream), Start)
        proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:  # the first signal is handled (two pending ones would merge)
            return any(r.status == "draining" for r in await system.client.registry.replicas("p"))

        await wait_until(draining, 5, "the replica draining")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 130
        await stream.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
