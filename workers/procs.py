"""Worker processes as the supervisor sees them: spawn, exit with backoff, SIGTERM, wait.

A worker reads its pools config from a file: the config its supervisor runs, written as JSON to
one file per version (:func:`write_config`), so a replica always starts with its supervisor's
config, whether that came from the pools file, a config API or Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from agentpool.shared.config import Config
from agentpool.shared.names import replica_id
from agentpool.shared.settings import Settings

log = logging.getLogger("agentpool.supervisor")

HEALTHY_AFTER_S = 30.0  # a replica that lived this long resets its failure count
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
KEEP_CONFIG_FILES = 5  # config versions whose files a supervisor keeps for its starting workers
# The worker reads the file it is given: the config API is its supervisor's business (and its
# headers hold secrets).
NOT_FOR_WORKERS = ("AGENTPOOL_CONFIG_URL", "AGENTPOOL_CONFIG_HEADERS", "AGENTPOOL_CONFIG_POLL_S")


@dataclass
class Replica:
    """One slot this supervisor holds the lease of, and the process running it."""

    pool: str
    deployment: str
    n: int
    generation: int = 0  # the pool's restart generation when it was started (-1: replace it)
    fingerprint: str = ""  # of what it was built from (config_source.deployment_fingerprint)
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


def worker_env(settings: Settings, extra: dict[str, str], config_file: str | None = None) -> dict[str, str]:
    """The child's environment: our settings, its config file, and our pid so an orphaned worker
    drains itself."""
    return {
        **{k: v for k, v in os.environ.items() if k not in NOT_FOR_WORKERS},
        "AGENTPOOL_CONFIG": config_file or settings.config_path,
        "AGENTPOOL_NAMESPACE": settings.namespace,
        "AGENTPOOL_AMQP_URL": settings.amqp_url,
        "AGENTPOOL_REDIS_URL": settings.redis_url,
        "AGENTPOOL_PARENT_PID": str(os.getpid()),
        **extra,
    }


def write_config(config: Config, folder: str, version: str) -> str:
    """The config as a JSON pools file for workers, ``{folder}/{version}.json`` (written atomically,
    once per version); only the newest ``KEEP_CONFIG_FILES`` stay."""
    path = Path(folder) / f"{version}.json"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{version}.", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(config))
        os.replace(tmp, path)
    files = sorted(Path(folder).glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[KEEP_CONFIG_FILES:]:  # a worker reads its file as it starts, then never again
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
    return str(path)


STANDBY_CLOSE_S = 5.0


class Standby:
    """One spare worker process, started ahead of need, that has imported the worker runtime and
    the providers the pools file uses and waits on its stdin for a slot.

    Starting a replica is mostly interpreter start and imports (``import anthropic`` is ~3,200
    modules, about 3 s on 2 CPUs), so handing the next slot to a spare cuts a scale-up or a
    restart to connect + warm. The spare exits when its stdin closes (the supervisor is gone).
    """

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._env: dict[str, str] = {}

    async def take(self, r: Replica, env: dict[str, str]) -> bool:
        """Give ``r``'s slot to the spare; False if there is none fit to take it."""
        p, self.proc = self.proc, None
        if p is None:
            return False
        if p.returncode is not None or p.stdin is None or env != self._env:
            await _discard(p)
            return False
        try:
            p.stdin.write(f"{r.pool}\t{r.deployment}\t{r.n}\n".encode())
            await p.stdin.drain()
            p.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            await _discard(p)
            return False
        r.proc = p
        r.started_at = time.monotonic()
        return True

    async def refill(self, env: dict[str, str]) -> None:
        if self.proc is not None and self.proc.returncode is None:
            return
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *_worker_cmd("--standby"), env=env, stdin=asyncio.subprocess.PIPE, start_new_session=True
            )
            self._env = env
        except OSError as e:
            log.warning("could not start a standby worker: %s", e)
            self.proc = None

    async def aclose(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            await _discard(p)


async def _discard(p: asyncio.subprocess.Process) -> None:
    """End a spare that holds no slot: EOF on stdin makes it exit; kill it if it does not."""
    if p.returncode is None and p.stdin is not None:
        p.stdin.close()
    try:
        async with asyncio.timeout(STANDBY_CLOSE_S):
            await p.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        await p.wait()


def _worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agentpool", "worker", *args]


async def spawn(r: Replica, env: dict[str, str], standby: Standby | None = None) -> None:
    """Start ``r``: on the standby process if there is one, else a new process."""
    if standby is not None:
        taken = await standby.take(r, env)
        await standby.refill(env)  # the next spare starts importing now
        if taken:
            return
    try:
        r.proc = await asyncio.create_subprocess_exec(
            *_worker_cmd("--pool", r.pool, "--deployment", r.deployment, "--replica", str(r.n)),
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
