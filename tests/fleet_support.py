"""Helpers for the fleet tests: pools files, supervisors (in process or as processes), load, counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aio_pika

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.registry import ReplicaInfo
from agentpool.shared.config import Config, parse_config
from agentpool.shared.errors import AgentPoolError
from agentpool.shared.messages import End
from agentpool.shared.names import Names, replica_id
from agentpool.shared.settings import Settings
from agentpool.workers.supervisor import Supervisor
from tests.conftest import EXAMPLE, PYTHON, subprocess_env, wait_until

BASE = dict(
    pool="p",
    replicas=1,
    concurrency=4,
    sticky_depth=3,
    max_depth=10,
    ttft_ms=20,
    tokens_per_s=400,
    reply_tokens=12,
    rescue_after_s=1,
    max_attempts=5,
)


def pools_file(
    tmp_path: Path, pool_extra: str = "", extra: str = "", top: str = "", **kw: object
) -> tuple[Path, Config]:
    """A pools file for pool ``p``: ``top`` top-level keys, ``pool_extra`` more keys of ``[pools.p]``,
    ``extra`` more tables."""
    text = top + EXAMPLE.format(**{**BASE, **kw})
    if pool_extra:
        text = text.replace("[pools.p]\n", f"[pools.p]\n{pool_extra}\n")
    text += extra
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path, parse_config(text, str(path))


@contextlib.asynccontextmanager
async def supervisors(
    settings: Settings, path: Path, config: Config, n: int = 1, stagger_s: float = 0.0
) -> AsyncIterator[list[Supervisor]]:
    """``n`` supervisors in this event loop (their workers are real processes), each started
    ``stagger_s`` after the one before; stopped on exit."""
    s = replace(settings, config_path=str(path))
    sups = [Supervisor(s, config) for _ in range(n)]
    stop = asyncio.Event()
    tasks = []
    for i, sup in enumerate(sups):
        if i and stagger_s:
            await asyncio.sleep(stagger_s)  # the scenario: supervisors that start a moment apart
        tasks.append(asyncio.create_task(sup.async_run(stop)))
    try:
        yield sups
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def spawn_supervisor(settings: Settings, path: Path) -> asyncio.subprocess.Process:
    """``agentpool workers`` as its own process (so a test can SIGKILL it)."""
    return await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "agentpool",
        "workers",
        "--metrics-port",
        "0",
        env={**subprocess_env(settings, path), "AGENTPOOL_LOG_FORMAT": "text"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def end_process(proc: asyncio.subprocess.Process, timeout_s: float = 45) -> None:
    """SIGTERM (a supervisor drains its workers), SIGKILL if it takes longer than ``timeout_s``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def ready(
    client: AgentPoolClient, pool: str = "p", exclude_pids: frozenset[int] = frozenset()
) -> list[ReplicaInfo]:
    """Live replicas whose heartbeat says ready (and whose process is not one we killed)."""
    live = await client.registry.replicas(pool)
    return [r for r in live if r.status == "ready" and r.pid not in exclude_pids]


async def wait_ready(client: AgentPoolClient, count: int, timeout_s: float = 30, pool: str = "p") -> None:
    async def ok() -> bool:
        return len(await ready(client, pool)) == count

    await wait_until(ok, timeout_s, f"{count} ready replicas of {pool}")


@dataclass
class Load:
    """Lanes of sequential ``ask`` calls with distinct threads; counts answers per replica."""

    client: AgentPoolClient
    pool: str = "p"
    answers: list[tuple[float, End]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    sent: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def lane(self, name: str, limit: int) -> None:
        k = 0
        while not self.stop.is_set() and self.sent < limit:
            self.sent += 1
            k += 1
            try:
                end = await self.client.ask(self.pool, f"{name} message {k}", thread_id=f"{name}-{k}")
            except AgentPoolError as e:
                depths = [(r.id, self.client.router.depth(r)) for r in self.client.router.members(self.pool)]
                e.add_note(f"at {time.monotonic():.3f}; members and depths {depths}")
                self.failures.append(e)
                continue
            self.answers.append((time.monotonic(), end))

    def run(self, lanes: int, limit: int) -> asyncio.Future[list[None]]:
        return asyncio.gather(*(self.lane(f"lane{i}", limit) for i in range(lanes)))

    def first_from(self, agents: set[str], after: float) -> float | None:
        return next((t for t, e in self.answers if t >= after and e.agent_id in agents), None)


async def delete_pool_objects(
    settings: Settings, pools: list[str], deployments: list[str], slots: int = 12
) -> None:
    """Queues and exchanges of pools the config does not name (per-tenant pools)."""
    names = Names(settings.namespace)
    conn = await aio_pika.connect(settings.amqp_url)
    async with conn:
        ch = await conn.channel()
        for pool in pools:
            for q in [names.pool_queue(pool), names.parking_queue(pool)] + [
                names.replica_queue(replica_id(pool, d, n)) for d in deployments for n in range(1, slots + 1)
            ]:
                await ch.queue_delete(q)
            await ch.exchange_delete(names.pool_exchange(pool))
