#!/usr/bin/env python3
"""Agent benchmarks: CPU per tool round, and a slow factory paid once per replica vs per request.

1. ``rounds``: one worker process (fake model at zero latency, a no-op tool) answers N requests,
   each with K tool rounds (``@chain {"n": K}``: the tool asks for itself K times) and, in the same
   invocation, N plain requests (K = 0). CPU of the worker process (and of this, the client
   process) per tool round = (CPU with K rounds - CPU without) / (N * K).
2. ``factory``: a ``kind = "python"`` agent whose factory takes ``--build-s`` (3 s): request latency
   on a warm replica, against building the agent for every request (the factory, then the same
   run, in this process, on the same fake model).

    python bench/agents.py --n 300 --rounds 4 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = """
[providers.fake]
kind = "fake"
reply_tokens = 20

[agent_types.tools]
provider = "fake"
system_prompt = "bench"
history_turns = 0
tools = ["bench.agent_support:chain", "bench.agent_support:noop"]
max_tool_rounds = 50

[agent_types.slow]
kind = "python"
provider = "fake"
factory = "bench.agent_support:slow_build"
options = {{ build_s = {build_s} }}
history_turns = 0

[pools.tools]
limits = {{ concurrency = 16, max_depth = 1000, rescue_after_s = 60 }}
[[pools.tools.deployments]]
name = "d"
agent_type = "tools"
replicas = 1

[pools.slow]
limits = {{ concurrency = 16, max_depth = 1000, rescue_after_s = 60 }}
[[pools.slow.deployments]]
name = "d"
agent_type = "slow"
replicas = 1
"""


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def batch(client, pool: str, content: str, n: int, conc: int) -> list[float]:
    """n asks at ``conc`` in flight; each ask's latency in ms."""
    todo = iter(range(n))
    out: list[float] = []

    async def lane() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await client.ask(pool, content)
            out.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(lane() for _ in range(conc)))
    return out


async def rounds_run(client, pid: int, n: int, k: int, conc: int) -> dict[str, float]:
    await batch(client, "tools", '@chain {"n": 2}', 50, conc)  # warm-up
    cpu = {}
    for label, content in (("plain", "hello"), ("tools", f'@chain {{"n": {k}}}')):
        w0, c0 = cpu_s(pid), time.process_time()
        await batch(client, "tools", content, n, conc)
        cpu[label] = (cpu_s(pid) - w0, time.process_time() - c0)
    worker = (cpu["tools"][0] - cpu["plain"][0]) / (n * k) * 1000
    local = (cpu["tools"][1] - cpu["plain"][1]) / (n * k) * 1000
    return {
        "worker_ms_per_round": worker,
        "client_ms_per_round": local,
        "worker_ms_per_plain_request": cpu["plain"][0] / n * 1000,
    }


async def per_request_build(build_s: float, runs: int) -> list[float]:
    """Build the agent for each request (what a fleet without warm replicas pays), then run it."""
    from agentpool.shared.config import AgentType
    from agentpool.shared.config import Provider as ProviderConfig
    from agentpool.workers.agents.api import Setup, Turn
    from agentpool.workers.agents.llm import LLM
    from agentpool.workers.providers.fake import FakeProvider
    from bench.agent_support import slow_build

    agent_type = AgentType(provider="fake", kind="python", factory="bench.agent_support:slow_build")
    provider = FakeProvider(ProviderConfig(kind="fake", reply_tokens=20), agent_type)
    out = []
    for i in range(runs):
        t0 = time.perf_counter()
        llm = LLM(provider, retries=0)
        setup = Setup("slow", agent_type, "bench-1", "slow", "d", llm, [], {"build_s": build_s})
        agent = await asyncio.to_thread(slow_build, setup)
        turn = Turn(f"r{i}", "hello", "t", "default", [], {}, time.time() + 60, llm.for_request())
        async for _ in agent.run(turn):
            pass
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def wait_ready(client, pools: list[str], timeout_s: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        infos = {p: [r for r in await client.registry.replicas(p) if r.status == "ready"] for p in pools}
        if all(infos.values()):
            await client.refresh_membership()
            return {p: infos[p][0].build_ms for p in pools}
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not ready: {infos}")
        await asyncio.sleep(0.1)


def start_worker(env: dict[str, str], pool: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "agentpool", "worker", "--pool", pool, "--deployment", "d", "--replica", "1"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT)


async def one_invocation(args) -> dict[str, float]:
    from agentpool.broker.client import AgentPoolClient
    from agentpool.shared.config import load_config
    from agentpool.shared.settings import Settings
    from tests.conftest import cleanup_namespace

    cfg = Path(tempfile.mkdtemp()) / "agents.toml"
    cfg.write_text(CONFIG.format(build_s=args.build_s))
    env = {
        **os.environ,
        "AGENTPOOL_NAMESPACE": "bench" + secrets.token_hex(3),
        "AGENTPOOL_CONFIG": str(cfg),
        "AGENTPOOL_LOG_LEVEL": "WARNING",
    }
    settings = Settings.from_env(env)
    config = load_config(cfg)
    procs = [start_worker(env, "tools"), start_worker(env, "slow")]
    try:
        async with AgentPoolClient(settings, config) as client:
            build = await wait_ready(client, ["tools", "slow"], 60 + args.build_s)
            row = await rounds_run(client, procs[0].pid, args.n, args.rounds, args.conc)
            warm = await batch(client, "slow", "hello", 20, 1)
            row["slow_build_ms"] = build["slow"]
            row["warm_p50_ms"] = statistics.median(warm)
            row["warm_max_ms"] = max(warm)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        await cleanup_namespace(settings, config)
    cold = await per_request_build(args.build_s, args.cold_runs)
    row["per_request_build_p50_ms"] = statistics.median(cold)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="requests per CPU measurement")
    ap.add_argument("--rounds", type=int, default=4, help="tool rounds per request")
    ap.add_argument("--conc", type=int, default=8, help="requests in flight")
    ap.add_argument("--build-s", type=float, default=3.0)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import uvloop

    rows = []
    for i in range(args.repeat):
        row = uvloop.run(one_invocation(args))
        rows.append(row)
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"\nmedians of {args.repeat} runs ({args.n} requests x {args.rounds} tool rounds, "
        f"{args.conc} in flight):"
    )
    print(f"  worker CPU per tool round      {med['worker_ms_per_round']:.3f} ms")
    print(f"  client CPU per tool round      {med['client_ms_per_round']:.3f} ms")
    print(f"  worker CPU per plain request   {med['worker_ms_per_plain_request']:.3f} ms")
    print(
        f"  factory ({args.build_s:g} s) build_ms       {med['slow_build_ms']:.0f} ms, paid once per replica"
    )
    print(f"  warm request p50 / max         {med['warm_p50_ms']:.2f} / {med['warm_max_ms']:.2f} ms")
    ratio = med["per_request_build_p50_ms"] / med["warm_p50_ms"]
    print(
        f"  building per request p50       {med['per_request_build_p50_ms']:.0f} ms "
        f"({ratio:.0f}x the warm request)"
    )


if __name__ == "__main__":
    main()
