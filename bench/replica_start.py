#!/usr/bin/env python3
"""Replica start benchmark: spawn-to-ready time of a new replica, and RSS of a warm one, per provider.

For each provider (the in-process fake, and the anthropic / openai SDK providers pointed at
``agentpool fake-llm`` on loopback) it starts ``agentpool worker`` processes one at a time in a
throw-away namespace and measures, per replica:

- spawn-to-ready: ``exec`` of the process -> its heartbeat says ``ready`` (Python start, imports,
  connect to RabbitMQ/Redis, declare queues, warm the provider: what a scale-up waits for);
- warm-up: the replica's own ``warmup_ms`` (connect + declare + warm, without interpreter start);
- RSS: ``VmRSS`` of the process after it answered ``--requests`` requests;
- the same again for a standby (``agentpool worker --standby``, the supervisor's spare): from the
  moment its imports are done and the slot is written to it, to ``ready``.

    python bench/replica_start.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = """
[providers.fake]
kind = "fake"

[providers.anthropic]
kind = "anthropic"
base_url = "http://127.0.0.1:{port}"
api_key_env = "FAKE_LLM_API_KEY"

[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
api_key_env = "FAKE_LLM_API_KEY"
{sections}"""

SECTION = """
[agent_types.{kind}]
provider = "{kind}"
model = "bench-1"
max_tokens = 32

[pools.{kind}]
limits = {{ concurrency = 4, sticky_depth = 3, max_depth = 10, rescue_after_s = 5 }}

[[pools.{kind}.deployments]]
name = "d"
agent_type = "{kind}"
replicas = 0
"""
KINDS = ("fake", "anthropic", "openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


async def start_standby(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """A supervisor's spare (``agentpool worker --standby``), returned once its imports are done."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentpool", "worker", "--standby",
        env={**env, "AGENTPOOL_LOG_LEVEL": "DEBUG", "AGENTPOOL_LOG_FORMAT": "text"},
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    while b"standby ready" not in (line := await proc.stderr.readline()):
        if not line:
            raise RuntimeError("the standby process exited")

    async def drain(stream: asyncio.StreamReader) -> None:  # its log must never block it
        while await stream.read(65536):
            pass

    return proc, asyncio.create_task(drain(proc.stderr))


async def one_replica(
    client, env: dict[str, str], kind: str, n: int, requests: int, standby: bool
) -> dict[str, float]:  # type: ignore[no-untyped-def]
    drain = None
    if standby:  # the clock starts when the supervisor would hand over the slot
        proc, drain = await start_standby(env)
        t0 = time.monotonic()
        assert proc.stdin is not None
        proc.stdin.write(f"{kind}\td\t{n}\n".encode())
        await proc.stdin.drain()
        proc.stdin.close()
    else:
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentpool", "worker", "--pool", kind, "--deployment", "d",
            "--replica", str(n), env=env,
        )  # fmt: skip
    rid = f"{kind}-d-{n}"
    info = {}

    async def ready() -> bool:
        found = [r for r in await client.registry.replicas(kind) if r.id == rid and r.status == "ready"]
        if found:
            info["warmup_ms"] = found[0].warmup_ms
        return bool(found)

    try:
        await wait_for(ready, 60, f"{rid} ready")
        spawn_ms = (time.monotonic() - t0) * 1000
        await wait_for(lambda: _member(client, kind, rid), 10, f"{rid} routable")
        for i in range(requests):
            await client.ask(kind, f"warm me up {i}", thread_id=f"{rid}-{i}")
        return {"spawn_ms": spawn_ms, "warmup_ms": info["warmup_ms"], "rss_mb": rss_mb(proc.pid)}
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        if drain is not None:
            await drain


async def _member(client, pool: str, rid: str) -> bool:  # type: ignore[no-untyped-def]
    await client.refresh_membership()
    return [r.id for r in client.router.members(pool)] == [rid]


async def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from agentpool.broker.client import AgentPoolClient
    from agentpool.shared.config import load_config
    from agentpool.shared.settings import Settings
    from tests.conftest import cleanup_namespace

    port = free_port()
    cfg = Path(tempfile.mkdtemp()) / "bench.toml"
    cfg.write_text(CONFIG.format(port=port, sections="".join(SECTION.format(kind=k) for k in args.kinds)))
    env = {
        **os.environ,
        "AGENTPOOL_NAMESPACE": "bench" + secrets.token_hex(3),
        "AGENTPOOL_CONFIG": str(cfg),
        "AGENTPOOL_LOG_LEVEL": "WARNING",
        "FAKE_LLM_API_KEY": "sk-bench",
    }
    fake = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentpool.fake_llm",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "0",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    settings = Settings.from_env(env)
    config = load_config(cfg)
    out: dict[str, dict[str, float]] = {}
    try:
        await _wait_port(port)
        async with AgentPoolClient(settings, config) as client:
            for kind in args.kinds:
                runs = [
                    await one_replica(client, env, kind, n, args.requests, standby=False)
                    for n in range(1, args.runs + 1)
                ]
                spares = [
                    await one_replica(client, env, kind, n, args.requests, standby=True)
                    for n in range(1, args.runs + 1)
                ]
                out[kind] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                out[kind]["spawn_max_ms"] = max(r["spawn_ms"] for r in runs)
                out[kind]["standby_ms"] = statistics.median(r["spawn_ms"] for r in spares)
                out[kind]["standby_max_ms"] = max(r["spawn_ms"] for r in spares)
                out[kind]["standby_rss_mb"] = statistics.median(r["rss_mb"] for r in spares)
                print(f"{kind}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[kind].items()), flush=True)
    finally:
        fake.send_signal(signal.SIGTERM)
        await asyncio.wait_for(fake.wait(), 10)
        await cleanup_namespace(settings, config)
    return out


async def _wait_port(port: int) -> None:
    async def up() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    await wait_for(up, 20, "fake-llm listening")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="replicas started (one at a time) per provider")
    ap.add_argument("--requests", type=int, default=5, help="answers per replica before RSS is read")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = ap.parse_args()
    out = asyncio.run(run(args))
    print(f"\nmedians of {args.runs} replicas started one at a time ({os.cpu_count()} CPUs)")
    print("(standby: the supervisor's spare, imports done, given the slot; it loads every provider")
    print(" kind of the pools file, so its RSS is that of all of them)")
    print("| provider | spawn-to-ready ms (max) | standby slot-to-ready ms (max) | in-process warm-up ms "
          "| RSS warm MB | RSS warm MB, standby |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kind, r in out.items():
        spawn = f"{r['spawn_ms']:.0f} ({r['spawn_max_ms']:.0f})"
        spare = f"{r['standby_ms']:.0f} ({r['standby_max_ms']:.0f})"
        print(
            f"| {kind} | {spawn} | {spare} | {r['warmup_ms']:.0f} | {r['rss_mb']:.1f} | "
            f"{r['standby_rss_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
