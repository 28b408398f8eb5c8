"""Worker processes as the supervisor sees them: spawn, exit with backoff, SIGTERM, wait."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from shared.names import replica_id
from shared.settings import Settings

log = logging.getLogger("agentpool.supervisor")

HEALTHY_AFTER_S = 30.0  # a replica that lived this long resets its failure count
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


@dataclass
class Replica:
    """One slot this supervisor holds the lease of, and the process running it."""

    pool: str
    deployment: str
    n: int
    generation: int = 0  # the pool's restart generation when it was started
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0  # monotonic
    failures: int = 0
    next_start: float = 0.0
    stopping: bool = False  # retiring: its lease no longer counts; SIGTERM sent, draining
    lost: bool = False  # its lease was taken by another owner: stop, never release
    exits: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return replica_id(self.pool, self.deployment, self.n)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.pool, self.deployment, self.n)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


def worker_env(settings: Settings, extra: dict[str, str]) -> dict[str, str]:
    """The child's environment: our settings, and our pid so an orphaned worker drains itself."""
    return {
        **os.environ,
        "AGENTPOOL_CONFIG": settings.config_path,
        "AGENTPOOL_NAMESPACE": settings.namespace,
        "AGENTPOOL_AMQP_URL": settings.amqp_url,
        "AGENTPOOL_REDIS_URL": settings.redis_url,
        "AGENTPOOL_PARENT_PID": str(os.getpid()),
        **extra,
    }


async def spawn(r: Replica, env: dict[str, str]) -> None:
    try:
        r.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentpool",
            "worker",
            "--pool",
            r.pool,
            "--deployment",
            r.deployment,
            "--replica",
            str(r.n),
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only; it drains them
        )
    except OSError as e:
        log.error("could not start replica %s: %s", r.id, e)
        r.proc = None
        r.started_at = time.monotonic()
        on_exit(r, r.started_at, code=-1)
        return
    r.started_at = time.monotonic()


def on_exit(r: Replica, now: float, code: int | None = None) -> None:
    """Note a dead process and when to start it again (exponential backoff for quick deaths)."""
    code = code if code is not None else (r.proc.returncode if r.proc is not None else -1)
    lived = now - r.started_at
    r.failures = 0 if lived > HEALTHY_AFTER_S else r.failures + 1
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, r.failures - 1)) if r.failures else 0.0
    r.next_start = now + delay
    r.exits.append(code or 0)
    log.warning("replica %s exited with %s after %.1fs; restarting in %.1fs", r.id, code, lived, delay)
    r.proc = None


def terminate(r: Replica) -> None:
    """Ask the process to drain (stop taking work, finish what it has, give back the rest)."""
    r.stopping = True
    if r.alive:
        assert r.proc is not None
        with contextlib.suppress(ProcessLookupError):
            r.proc.send_signal(signal.SIGTERM)


async def stop_all(replicas: list[Replica], timeout_s: float) -> None:
    """SIGTERM every live process, wait up to ``timeout_s`` for them to drain, then SIGKILL."""
    live = [r for r in replicas if r.alive]
    for r in live:
        terminate(r)
    procs = [r.proc for r in live if r.proc is not None]
    if not procs:
        return
    await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=timeout_s)
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
