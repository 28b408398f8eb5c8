#!/usr/bin/env python3
"""The router's own cost per request: ``Router.plan`` per strategy, in process, no services.

What ``bench/ab.py --strategies`` measures end to end, minus everything else a request does, so
a difference of a few microseconds is not lost in the machine's noise. Replicas carry heartbeats
and this router's own outstanding requests, as at 16 in flight; ``--other-pools`` adds pools the
router also knows (per-tenant pools), which a plan should not have to walk.

    python bench/plan_cost.py --replicas 4 --in-flight 16
    python bench/plan_cost.py --replicas 4 --in-flight 16 --other-pools 300
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentpool.broker.registry import ReplicaInfo
from agentpool.broker.router import Router
from agentpool.shared.config import Pool, parse_config
from bench.ab import DEFAULT_STRATEGIES
from bench.roundtrip import CONFIG


def pool(strategy: str, replicas: int) -> Pool:
    text = CONFIG.format(ttft_ms=0, reply_tokens=20, concurrency=16, replicas=replicas)
    text = text.replace("[pools.bench]\n", f'[pools.bench]\nstrategy = "{strategy}"\n', 1)
    return parse_config(text, "bench.toml").pools["bench"]


def router(replicas: int, in_flight: int, other_pools: int) -> Router:
    """A router that knows ``replicas`` live replicas of pool ``bench``, each with a heartbeat half
    a second old and its share of ``in_flight`` requests published by this router."""
    now = time.time()
    r = Router()
    per = in_flight // replicas
    infos = [
        ReplicaInfo(
            id=f"bench-d-{n}", pool="bench", deployment="d", status="ready", in_flight=per,
            heartbeat_at=now - 0.5, avg_latency_ms=30.0, p50_latency_ms=28.0,
        )
        for n in range(1, replicas + 1)
    ]  # fmt: skip
    r.update("bench", infos)
    for info in infos:
        for _ in range(per):
            r.published(info.id, True)
    for k in range(other_pools):
        r.update(f"t{k}", [ReplicaInfo(id=f"t{k}-d-{n}", pool=f"t{k}", deployment="d", status="ready",
                                       heartbeat_at=now) for n in range(1, replicas + 1)])  # fmt: skip
    return r


def costs(sides: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Per strategy, one plan in microseconds: the best of ``--repeat`` interleaved rounds (the
    least disturbed by other processes, as ``timeit`` advises)."""
    routers = {
        s: (router(args.replicas, args.in_flight, args.other_pools), pool(s, args.replicas)) for s in sides
    }
    threads = [uuid.uuid4().hex for _ in range(args.n)]
    times: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(args.repeat):
        for s, (r, p) in routers.items():
            t0 = time.perf_counter()
            for thread in threads:
                r.plan("bench", p, thread)
            times[s].append((time.perf_counter() - t0) / args.n * 1e6)
    return {s: min(ts) for s, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--other-pools", type=int, default=0)
    ap.add_argument("--n", type=int, default=20000, help="plans per timing")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    sides = ["sticky", *DEFAULT_STRATEGIES]
    cost = costs(sides, args)
    print(f"Router.plan, {args.replicas} replicas, {args.in_flight} in flight, {args.other_pools} other "
          f"pools, best of {args.repeat} x {args.n} plans")  # fmt: skip
    print("| strategy | us per plan | vs sticky | extra us per request |")
    print("|---|---|---|---|")
    for s in sides:
        c = cost[s]
        print(f"| {s} | {c:.1f} | {c / cost['sticky']:.2f}x | {c - cost['sticky']:+.1f} |")


if __name__ == "__main__":
    main()
