#!/usr/bin/env python3
"""Time to first token through the whole system vs calling the model directly, same run.

Starts ``agentpool fake-llm`` with a fixed first-token delay (default 200 ms), a pool whose
replicas use the real ``openai`` SDK against it, and the gateway; then measures, at each
concurrency, TTFT (a) calling the fake server directly with the openai SDK from this process and
(b) through gateway -> RabbitMQ -> worker -> SDK -> fake server -> Redis stream -> SSE. The added
overhead is (b) - (a), p50 and p99.

    python bench/ttft.py --conc 1 64 --n 300 --repeat 3
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

from agentpool.broker.client import MEMBERSHIP_REFRESH_S  # noqa: E402
from bench.roundtrip import cleanup, closed_loop, http_one, pct, stop  # noqa: E402

CONFIG = """
[providers.fake-openai]
kind = "openai"
base_url = "http://127.0.0.1:{llm_port}/v1"
api_key_env = "FAKE_LLM_API_KEY"

[agent_types.bench]
provider = "fake-openai"
model = "gpt-fake"
system_prompt = "bench"
history_turns = 0
max_tokens = 64

[pools.bench]
limits = {{ concurrency = {concurrency}, sticky_depth = 3, max_depth = 1000, rescue_after_s = 30 }}

[[pools.bench.deployments]]
name = "d"
agent_type = "bench"
replicas = {replicas}
"""


async def direct(llm_port: int, conc: int, n: int) -> list[float]:
    """TTFT calling the fake server straight from this process with the openai SDK."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{llm_port}/v1", api_key="sk-bench", max_retries=0)

    async def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = 0.0
        stream = await client.chat.completions.create(
            model="gpt-fake",
            stream=True,
            max_completion_tokens=64,
            messages=[{"role": "system", "content": "bench"}, {"role": "user", "content": f"bench {i}"}],
        )
        async for chunk in stream:
            if not first and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        t = time.perf_counter()
        return (first or t) - t0, t - t0

    try:
        await closed_loop(conc, min(n, 64), 20, one)
        res, _ = await closed_loop(conc, n, 60, one)
    finally:
        await client.close()
    return [r[0] * 1000 for r in res]


async def through(port: int, conc: int, n: int) -> list[float]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        one = http_one(s, f"http://127.0.0.1:{port}/v1/ask/bench")
        await closed_loop(conc, min(n, 64), 20, one)
        res, _ = await closed_loop(conc, n, 60, one)
    return [r[0] * 1000 for r in res]


async def wait_http(
    url: str, deadline_s: float = 30, headers: dict[str, str] | None = None, until: str = ""
) -> None:
    """Until ``url`` answers 200 (and its body contains ``until``)."""
    import aiohttp

    end = time.monotonic() + deadline_s
    async with aiohttp.ClientSession(headers=headers) as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200 and until in await r.text():
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(url)
            await asyncio.sleep(0.1)


def run_once(args: argparse.Namespace, conc: int) -> dict[str, float]:
    import uvloop

    ns = "bttft" + secrets.token_hex(3)
    llm_port, port = 19100 + secrets.randbelow(500), 19700 + secrets.randbelow(500)
    cfg = Path(tempfile.mkdtemp()) / "bench.toml"
    cfg.write_text(
        CONFIG.format(llm_port=llm_port, concurrency=args.worker_concurrency, replicas=args.replicas)
    )
    env = {
        **os.environ,
        "AGENTPOOL_NAMESPACE": ns,
        "AGENTPOOL_CONFIG": str(cfg),
        "FAKE_LLM_API_KEY": "sk-bench",
        "AGENTPOOL_LOG_LEVEL": "WARNING",
    }
    py = [sys.executable, "-m", "agentpool"]
    procs = [
        subprocess.Popen(
            [
                *py,
                "fake-llm",
                "--port",
                str(llm_port),
                "--ttft-ms",
                str(args.ttft_ms),
                "--tokens-per-s",
                "0",
                "--reply-tokens",
                "20",
            ],
            env=env,
        )
    ]
    procs += [
        subprocess.Popen(
            [*py, "worker", "--pool", "bench", "--deployment", "d", "--replica", str(n)], env=env
        )
        for n in range(1, args.replicas + 1)
    ]
    procs.append(subprocess.Popen([*py, "gateway", "--host", "127.0.0.1", "--port", str(port)], env=env))
    try:

        async def go() -> dict[str, float]:
            await wait_http(
                f"http://127.0.0.1:{llm_port}/v1/models", headers={"Authorization": "Bearer sk-bench"}
            )
            # every replica warm and in the gateway's membership (refreshed each 0.5 s)
            ready = f'"ready":{args.replicas},'
            await wait_http(f"http://127.0.0.1:{port}/v1/pools", until=ready)
            await asyncio.sleep(MEMBERSHIP_REFRESH_S * 2)
            d = await direct(llm_port, conc, args.n)
            t = await through(port, conc, args.n)
            return {
                "direct_p50": pct(d, 50),
                "direct_p99": pct(d, 99),
                "system_p50": pct(t, 50),
                "system_p99": pct(t, 99),
                "overhead_p50": pct(t, 50) - pct(d, 50),
                "overhead_p99": pct(t, 99) - pct(d, 99),
            }

        return uvloop.run(go())
    finally:
        stop(procs)
        uvloop.run(cleanup(env))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conc", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ttft-ms", type=float, default=200)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--worker-concurrency", type=int, default=32)
    args = ap.parse_args()
    print(f"TTFT with the fake LLM at {args.ttft_ms:.0f} ms to first token; medians of {args.repeat} runs")
    print("| in flight | direct p50 / p99 ms | through agentpool p50 / p99 ms | added p50 / p99 ms |")
    print("|---|---|---|---|")
    for conc in args.conc:
        runs = [run_once(args, conc) for _ in range(args.repeat)]
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {conc} | {m['direct_p50']:.1f} / {m['direct_p99']:.1f} | {m['system_p50']:.1f} / "
            f"{m['system_p99']:.1f} | {m['overhead_p50']:.1f} / {m['overhead_p99']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
