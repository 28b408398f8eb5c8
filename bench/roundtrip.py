#!/usr/bin/env python3
"""Round-trip benchmark: N requests at concurrency C through agentpool, fake model at zero latency.

Starts real processes in a throw-away namespace (one worker replica, and for ``--via http`` the
gateway), drives a closed loop from this process, and prints requests/s and p50/p99 latency to the
first chunk and to the last event. ``--floor`` also runs ../shared/bench/floor.py (scenario c) in
the same invocation so figures can be quoted as ratios to it.

    python bench/roundtrip.py --via http --conc 1 16 256 --repeat 3 --floor
    python bench/roundtrip.py --via client --conc 16 --n 2000

``--via client`` measures the Python client (what internal services use: same process shape as
floor.py's gateway role); ``--via http`` adds the HTTP gateway and SSE in front of it.
Everything is bounded: each run stops after ``--n`` requests or ``--seconds``, whichever is first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
ttft_ms = {ttft_ms}
tokens_per_s = 0
reply_tokens = {reply_tokens}

[agent_types.bench]
provider = "fake"
system_prompt = "bench"
history_turns = 0

[pools.bench]
limits = {{ concurrency = {concurrency}, sticky_depth = 3, max_depth = 1000, rescue_after_s = 30 }}

[[pools.bench.deployments]]
name = "d"
agent_type = "bench"
replicas = {replicas}
"""


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process, then wait for each (20 s, then SIGKILL)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def closed_loop(conc: int, n: int, seconds: float, one) -> tuple[list[tuple[float, float]], float]:
    results: list[tuple[float, float]] = []
    counter = iter(range(n))
    deadline = time.monotonic() + seconds

    async def lane() -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            results.append(await one(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(conc)))
    return results, time.perf_counter() - t0


def http_one(session, url: str):
    import aiohttp  # noqa: F401

    async def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = 0.0
        async with session.post(
            url,
            data=b'{"content":"bench ' + str(i).encode() + b'","stream":true}',
            headers={"content-type": "application/json"},
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
            async for line in r.content:
                if not first and line.startswith(b"event: chunk"):
                    first = time.perf_counter()
                elif line.startswith(b"event: end"):
                    break
                elif line.startswith(b"event: error"):
                    raise RuntimeError("error event")
        t = time.perf_counter()
        return (first or t) - t0, t - t0

    return one


def client_one(client):
    from agentpool.shared.messages import Chunk, End

    async def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = 0.0
        async for ev in client.stream("bench", f"bench {i}"):
            if not first and isinstance(ev, Chunk):
                first = time.perf_counter()
            if not isinstance(ev, (Chunk, End)) and type(ev).__name__ == "Error":
                raise RuntimeError(ev)
        t = time.perf_counter()
        return (first or t) - t0, t - t0

    return one


async def measure(args, env: dict[str, str], port: int, conc: int) -> dict[str, float]:
    if args.via == "http":
        import aiohttp

        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            one = http_one(s, f"http://127.0.0.1:{port}/v1/ask/bench")
            await closed_loop(conc, min(args.n, 200), 10, one)  # warm-up
            res, el = await closed_loop(conc, args.n, args.seconds, one)
    else:
        from agentpool.broker.client import AgentPoolClient
        from agentpool.shared.config import load_config
        from agentpool.shared.settings import Settings

        settings = Settings.from_env(env)
        async with AgentPoolClient(settings, load_config(settings.config_path)) as client:
            one = client_one(client)
            await closed_loop(conc, min(args.n, 200), 10, one)
            res, el = await closed_loop(conc, args.n, args.seconds, one)
    first = [r[0] * 1000 for r in res]
    last = [r[1] * 1000 for r in res]
    return {
        "conc": conc,
        "n": len(res),
        "rps": len(res) / el,
        "first_p50": pct(first, 50),
        "first_p99": pct(first, 99),
        "last_p50": pct(last, 50),
        "last_p99": pct(last, 99),
    }


def start_system(args, env: dict[str, str], port: int) -> list[subprocess.Popen]:
    procs = []
    for n in range(1, args.replicas + 1):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentpool",
                    "worker",
                    "--pool",
                    "bench",
                    "--deployment",
                    "d",
                    "--replica",
                    str(n),
                ],
                env=env,
            )
        )
    if args.via == "http":
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "agentpool", "gateway", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=ROOT,  # a custom strategy (bench.strategies:...) imports from the project root
            )
        )
    return procs


async def wait_ready(env: dict[str, str], port: int, args) -> None:
    from agentpool.broker.redis_conn import connect
    from agentpool.broker.registry import Registry
    from agentpool.shared.names import Names

    r = connect(env["AGENTPOOL_REDIS_URL"])
    reg = Registry(r, Names(env["AGENTPOOL_NAMESPACE"]))
    deadline = time.monotonic() + 30
    try:
        while len([x for x in await reg.replicas("bench") if x.status == "ready"]) < args.replicas:
            if time.monotonic() > deadline:
                raise TimeoutError("workers not ready")
            await asyncio.sleep(0.1)
        if args.via == "http":
            import aiohttp

            async with aiohttp.ClientSession() as s:
                while True:
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError("gateway not ready")
                    await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # let the gateway's membership cache see every replica
    finally:
        await r.aclose()


async def cleanup(env: dict[str, str]) -> None:
    from agentpool.shared.config import load_config
    from agentpool.shared.settings import Settings
    from tests.conftest import cleanup_namespace

    settings = Settings.from_env(env)
    await cleanup_namespace(settings, load_config(settings.config_path))


def run_once(args, conc: int) -> dict[str, float]:
    import uvloop

    ns = "bench" + secrets.token_hex(3)
    cfg = Path(tempfile.mkdtemp()) / "bench.toml"
    text = CONFIG.format(
        ttft_ms=args.ttft_ms, reply_tokens=20, concurrency=args.worker_concurrency, replicas=args.replicas
    )
    strategy = getattr(args, "strategy", "sticky")  # the pool's; bench/ab.py --strategies sets it
    cfg.write_text(text.replace("[pools.bench]\n", f'[pools.bench]\nstrategy = "{strategy}"\n', 1))
    port = 18000 + secrets.randbelow(2000)
    env = {
        **os.environ,
        "AGENTPOOL_NAMESPACE": ns,
        "AGENTPOOL_CONFIG": str(cfg),
        "AGENTPOOL_AMQP_URL": os.environ.get("AGENTPOOL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        "AGENTPOOL_REDIS_URL": os.environ.get("AGENTPOOL_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "AGENTPOOL_LOG_LEVEL": "WARNING",
        "AGENTPOOL_METRICS": os.environ.get("AGENTPOOL_METRICS", "1"),
        "AGENTPOOL_AUTH": os.environ.get("AGENTPOOL_AUTH", "open"),  # the gateway's default is required
    }
    procs = start_system(args, env, port)
    try:
        uvloop.run(wait_ready(env, port, args))
        return uvloop.run(measure(args, env, port, conc))
    finally:
        stop(procs)
        uvloop.run(cleanup(env))


DEFAULT_FLOOR = ROOT.parent / "shared" / "bench" / "floor.py"  # the team's shared bench kit


def run_floor(floor: Path, concs: list[int], repeat: int) -> dict[int, dict[str, float]]:
    out = Path(tempfile.mkdtemp()) / "floor.json"
    subprocess.run(
        [sys.executable, str(floor), "--only", "c", "--repeat", str(repeat), "--json", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=1800,
    )
    runs = json.loads(out.read_text())["runs"]
    found: dict[int, dict[str, float]] = {}
    for c in concs:
        ok = [r for r in runs.get(f"c_c{c}", []) if "rps" in r]
        if ok:
            found[c] = {
                k: statistics.median(r[k] for r in ok)
                for k in ("rps", "first_p50", "first_p99", "last_p50", "last_p99")
            }
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--via", choices=["http", "client"], default="http")
    ap.add_argument("--conc", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--n", type=int, default=2000, help="requests per measured run (upper bound)")
    ap.add_argument("--seconds", type=float, default=15, help="time cap per measured run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--worker-concurrency", type=int, default=16, help="prefetch per replica (floor uses 16)")
    ap.add_argument("--ttft-ms", type=float, default=0)
    ap.add_argument("--strategy", default="sticky", help="the pool's strategy (or package.module:callable)")
    ap.add_argument("--floor", action="store_true", help="also run floor.py scenario c, same invocation")
    ap.add_argument(
        "--floor-path",
        type=Path,
        default=Path(os.environ.get("AGENTPOOL_FLOOR", DEFAULT_FLOOR)),
        help=f"floor.py, the same round trip with no framework (default $AGENTPOOL_FLOOR or {DEFAULT_FLOOR})",
    )
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if args.floor and not args.floor_path.is_file():  # say so before minutes of runs, not after
        ap.error(
            f"--floor runs floor.py (the no-framework round trip of the shared bench kit, not in this "
            f"repo), and there is none at {args.floor_path}; pass --floor-path or set AGENTPOOL_FLOOR"
        )

    rows = []
    for conc in args.conc:
        runs = [run_once(args, conc) for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med["rps_min"], med["rps_max"] = min(r["rps"] for r in runs), max(r["rps"] for r in runs)
        rows.append(med)
        print(f"[{args.via}] c={conc}: " + json.dumps({k: round(v, 2) for k, v in med.items()}), flush=True)
    floor = run_floor(args.floor_path, args.conc, args.repeat) if args.floor else {}
    print(
        f"\nagentpool via {args.via}, fake model ttft={args.ttft_ms} ms, {args.replicas} replica(s), "
        f"medians of {args.repeat} runs"
    )
    print(
        "| in flight | req/s | first chunk p50 / p99 ms | last event p50 / p99 ms | floor req/s "
        "| ratio req/s | ratio first p50 | ratio last p50 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = floor.get(int(r["conc"]))
        ratios = (
            (
                f"{f['rps']:.0f} | {r['rps'] / f['rps']:.2f}x | {r['first_p50'] / f['first_p50']:.2f}x | "
                f"{r['last_p50'] / f['last_p50']:.2f}x"
            )
            if f
            else "- | - | - | -"
        )
        print(
            f"| {int(r['conc'])} | {r['rps']:.0f} | {r['first_p50']:.2f} / {r['first_p99']:.2f} | "
            f"{r['last_p50']:.2f} / {r['last_p99']:.2f} | {ratios} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "floor": floor, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
