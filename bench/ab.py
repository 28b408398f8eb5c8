#!/usr/bin/env python3
"""A/B on the round-trip benchmark, interleaved in one invocation: an environment setting, or the
pool's routing strategy.

Runs ``bench/roundtrip.py``'s measurement with ``VAR=A`` and ``VAR=B`` alternately (A B A B ...),
a fresh system each run, so drift on the machine hits both sides alike, and prints medians and
the B/A ratios. ``--strategies`` instead runs the pool with each strategy in turn (sticky, then
the others, round after round) and prints each one's ratio to sticky. What the issues ask of it:

    python bench/ab.py AGENTPOOL_METRICS 1 0 --conc 16 --rounds 5          # metrics overhead
    python bench/ab.py AGENTPOOL_ROUTING hash tiered --conc 16 --replicas 3 --rounds 5   # routing
    python bench/ab.py --strategies --conc 16 --replicas 4 --rounds 5     # each strategy vs sticky
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.roundtrip import run_once

# the built-in strategies, and a trivial custom one (bench/strategies.py)
DEFAULT_STRATEGIES = ["round_robin", "random", "least_loaded", "bench.strategies:shallowest"]
KEYS = ("rps", "last_p50", "last_p99")
Result = dict[str, float]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("var", nargs="?", help="the environment variable to A/B")
    p.add_argument("a", nargs="?")
    p.add_argument("b", nargs="?")
    p.add_argument(
        "--strategies",
        nargs="*",
        metavar="STRATEGY",
        help=f"A/B pool strategies against sticky instead (default: {' '.join(DEFAULT_STRATEGIES)})",
    )
    p.add_argument("--via", choices=["http", "client"], default="http")
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=2000, help="requests per measured run (upper bound)")
    p.add_argument("--seconds", type=float, default=10.0, help="time cap per measured run")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--worker-concurrency", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    args = p.parse_args()
    if args.strategies is None and args.b is None:
        p.error("give VAR A B, or --strategies")
    if args.strategies is not None and args.var is not None:
        p.error("--strategies compares strategies: leave out VAR A B")
    if args.strategies == []:
        args.strategies = DEFAULT_STRATEGIES
    args.repeat = 1
    args.strategy = "sticky"
    return args


def interleaved(
    args: argparse.Namespace, sides: list[str], apply: Callable[[str], str]
) -> dict[str, list[Result]]:
    """``--rounds`` rounds of one fresh run per side, in order; ``apply`` sets a side up and names it."""
    results: dict[str, list[Result]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides:
            name = apply(side)
            res = run_once(args, args.conc)
            results[side].append(res)
            load = os.getloadavg()[0]  # other work on the machine shows here: read the round with it
            print(f"round {r + 1} {name}: {res['rps']:.0f} req/s, last p50 {res['last_p50']:.2f} ms, "
                  f"load {load:.1f}", flush=True)  # fmt: skip
    return results


def medians(results: dict[str, list[Result]]) -> dict[str, Result]:
    return {side: {k: statistics.median(x[k] for x in rs) for k in KEYS} for side, rs in results.items()}


def ab_env(args: argparse.Namespace) -> None:
    def apply(value: str) -> str:
        os.environ[args.var] = value
        return f"{args.var}={value}"

    med = medians(interleaved(args, [args.a, args.b], apply))
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


def ab_strategies(args: argparse.Namespace) -> None:
    sides = ["sticky", *(s for s in args.strategies if s != "sticky")]

    def apply(strategy: str) -> str:
        args.strategy = strategy  # run_once writes it into the pool's config
        return f"strategy={strategy}"

    med = medians(interleaved(args, sides, apply))
    base = med["sticky"]
    print(f"\npool strategies vs sticky, via {args.via}, {args.conc} in flight, {args.replicas} "
          f"replica(s), medians of {args.rounds} interleaved rounds")  # fmt: skip
    print("| strategy | req/s | last event p50 ms | p99 ms | req/s / sticky | p50 / sticky |")
    print("|---|---|---|---|---|---|")
    for s in sides:
        m = med[s]
        print(
            f"| {s} | {m['rps']:.0f} | {m['last_p50']:.2f} | {m['last_p99']:.2f} | "
            f"{m['rps'] / base['rps']:.3f} | {m['last_p50'] / base['last_p50']:.3f} |"
        )


def main() -> None:
    args = parse_args()
    if args.strategies is None:
        ab_env(args)
    else:
        ab_strategies(args)


if __name__ == "__main__":
    main()
