#!/usr/bin/env python3
"""A/B of one environment setting on the round-trip benchmark, interleaved in one invocation.

Runs ``bench/roundtrip.py``'s measurement with ``VAR=A`` and ``VAR=B`` alternately (A B A B ...),
a fresh system each run, so drift on the machine hits both sides alike, and prints medians and
the B/A ratios. What the issues ask of it:

    python bench/ab.py AGENTPOOL_METRICS 1 0 --conc 16 --rounds 5          # metrics overhead
    python bench/ab.py AGENTPOOL_ROUTING hash tiered --conc 16 --replicas 3 --rounds 5   # routing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.roundtrip import run_once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("var")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--via", choices=["http", "client"], default="http")
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=2000, help="requests per measured run (upper bound)")
    p.add_argument("--seconds", type=float, default=10.0, help="time cap per measured run")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--worker-concurrency", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    args = p.parse_args()
    args.repeat = 1
    results: dict[str, list[dict[str, float]]] = {args.a: [], args.b: []}
    for r in range(args.rounds):
        for value in (args.a, args.b):
            os.environ[args.var] = value
            res = run_once(args, args.conc)
            results[value].append(res)
            print(
                f"round {r + 1} {args.var}={value}: {res['rps']:.0f} req/s, last p50 {res['last_p50']:.2f} ms"
            )
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("rps", "last_p50", "last_p99")}
           for v, rs in results.items()}  # fmt: skip
    a, b = med[args.a], med[args.b]
    print(f"\n{args.var}: {args.a} vs {args.b}, via {args.via}, {args.conc} in flight, "
          f"{args.replicas} replica(s), medians of {args.rounds} interleaved rounds")  # fmt: skip
    print("| setting | req/s | last event p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for v in (args.a, args.b):
        print(
            f"| {args.var}={v} | {med[v]['rps']:.0f} | {med[v]['last_p50']:.2f} | {med[v]['last_p99']:.2f} |"
        )
    print(f"| ratio {args.b}/{args.a} | {b['rps'] / a['rps']:.3f} | {b['last_p50'] / a['last_p50']:.3f} | "
          f"{b['last_p99'] / a['last_p99']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
