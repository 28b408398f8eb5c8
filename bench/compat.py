#!/usr/bin/env python3
"""OpenAI-compatible streaming vs the native SSE endpoint: one gateway process, one pool, one run.

Starts real processes in a throw-away namespace (``--replicas`` worker replicas of the built-in fake
model, and the gateway as a child of this process, so its pid is known), then alternates two
closed-loop phases at ``--conc`` in flight, ``--rounds`` times, the order swapped every round:

  ask     POST /v1/ask/bench          {"content": "...", "stream": true}
  compat  POST /v1/chat/completions   {"model": "bench", "stream": true,
                                       "stream_options": {"include_usage": true},
                                       "messages": [{"role": "user", "content": "..."}]}

Each phase reads the gateway's utime+stime from /proc/<pid>/stat before and after, so CPU per
request is the gateway's own (the workers', this load generator's and the whole host's are shown
beside it). It prints requests/s, latency to the first content and to the end of the body (p50 /
p99), CPU ms per request, medians over the rounds, the ratios compat/ask, and one JSON line. The
goal: compat within 10 % of ask in throughput and in gateway CPU per request.

    python bench/compat.py                       # 5 rounds x 3000 requests a side, about 1 min
    python bench/compat.py --quick               # 2 rounds x 300, a smoke test (~10 s)
    python bench/compat.py --rounds 9 --n 2000 --json /tmp/compat.json

Both sides share one aiohttp load generator in this process and read every body to its end, so
keep-alive connections are reused alike. Before the timed rounds one request of each kind is
decoded in full and checked (compat: a role delta first, content deltas equal to the stored
reply, a finish chunk, one usage chunk with ``choices == []``, then ``[DONE]``); a misbehaving
endpoint stops the run with what was sent and what came back.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.roundtrip import CONFIG, cleanup, closed_loop, pct, start_system, stop, wait_ready  # noqa: E402

SIDES = ("ask", "compat")
JSON_HEADERS = {"content-type": "application/json"}
ASK_BODY = b'{"content":"bench %d","stream":true}'
COMPAT_BODY = (
    b'{"model":"bench","stream":true,"stream_options":{"include_usage":true},'
    b'"messages":[{"role":"user","content":"bench %d"}]}'
)
PREFLIGHT_PROMPT = 10**9  # "bench 1000000000": the same prompt both ways, outside the timed range
TICK = os.sysconf("SC_CLK_TCK")
CPU_OF = ("gateway", "workers", "client", "rabbit", "redis", "others")  # where a phase's CPU went
Timing = tuple[float, float]  # seconds to the first content, to the end of the body
One = Callable[[int], Awaitable[Timing]]  # one timed request, as bench/roundtrip.py's closed_loop takes


class Misbehaved(RuntimeError):
    """The endpoint answered something the bench cannot time: the message says what was sent and got."""


def proc_cpu_s(pid: int) -> float:
    """utime+stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def host_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the host over all cores; busy excludes idle, iowait and steal."""
    with open("/proc/stat") as f:
        j = [int(x) for x in f.readline().split()[1:9]]
    total = sum(j)
    return (total - j[3] - j[4] - j[7]) / TICK, total / TICK


def pid_listening(port: int) -> int | None:
    """The pid listening on TCP ``port``, found by port, not by name (other servers of the kind may run)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in itertools.islice(f, 1, None):
                p = row.split()
                if p[3] == "0A" and p[1].endswith(f":{port:04X}"):  # 0A: LISTEN
                    inodes.add(f"socket:[{p[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
    return None


class Meters:
    """What a phase costs: CPU seconds of the gateway, the workers, this process, RabbitMQ, Redis and
    the whole host (the rest is "others": work on this machine that is not the bench's), and the
    commands Redis served (server-wide, so another user of this Redis counts too)."""

    def __init__(self, gateway: int, workers: list[int], redis: Any, env: dict[str, str]) -> None:
        self.gateway, self.workers, self.redis = gateway, workers, redis
        ports = {"rabbit": (env["AGENTPOOL_AMQP_URL"], 5672), "redis": (env["AGENTPOOL_REDIS_URL"], 6379)}
        self.services = {k: pid_listening(urlsplit(url).port or port) for k, (url, port) in ports.items()}

    async def now(self) -> dict[str, float]:
        stats = await self.redis.info("commandstats")
        busy, total = host_cpu_s()
        ours = {
            "gateway": proc_cpu_s(self.gateway),
            "workers": sum(proc_cpu_s(p) for p in self.workers),
            "client": time.process_time(),
        }
        ours |= {k: proc_cpu_s(pid) if pid else 0.0 for k, pid in self.services.items()}
        return ours | {
            "others": busy - sum(ours.values()),
            "host": busy,
            "wall": total,
            "redis_cmds": sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info"),
        }


def describe(sent: bytes, status: int, headers: Any, body: bytes, why: str) -> str:
    shown = body[:3000].decode(errors="replace") + (" ..." if len(body) > 3000 else "")
    hdrs = {k: v for k, v in headers.items() if k.lower() in ("content-type", "x-request-id", "x-agent-id")}
    return f"{why}\n  sent: {sent.decode()}\n  got: HTTP {status} {hdrs}\n  body: {shown}"


def ask_one(session: Any, url: str, first_at: int) -> One:
    """Native SSE: the first content is the ``first_at``-th ``event: chunk``; ends at ``event: end``."""
    seq = itertools.count()

    async def one(_: int) -> Timing:
        body = ASK_BODY % next(seq)
        t0 = time.perf_counter()
        first, seen, ended = 0.0, 0, False
        async with session.post(url, data=body, headers=JSON_HEADERS) as r:
            if r.status != 200:
                raise Misbehaved(describe(body, r.status, r.headers, await r.read(), "status"))
            async for line in r.content:  # to the end of the body: the connection is reused
                if line.startswith(b"event: chunk"):
                    seen += 1
                    if seen == first_at:
                        first = time.perf_counter()
                elif line.startswith(b"event: end"):
                    ended = True
                elif line.startswith(b"event: error"):
                    raise Misbehaved(describe(body, r.status, r.headers, line, "error event"))
        if not ended:
            raise Misbehaved(describe(body, r.status, r.headers, b"", "stream closed before event: end"))
        t = time.perf_counter()
        return (first or t) - t0, t - t0

    return one


def compat_one(session: Any, url: str, first_at: int) -> One:
    """OpenAI SSE: the first content is the ``first_at``-th ``data:`` line; ends at ``data: [DONE]``.

    No JSON is decoded here (the preflight did that once), so the load generator costs the same
    per event on both sides."""
    seq = itertools.count()

    async def one(_: int) -> Timing:
        body = COMPAT_BODY % next(seq)
        t0 = time.perf_counter()
        first, seen, done = 0.0, 0, False
        async with session.post(url, data=body, headers=JSON_HEADERS) as r:
            if r.status != 200:
                raise Misbehaved(describe(body, r.status, r.headers, await r.read(), "status"))
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                seen += 1
                if seen == first_at:
                    first = time.perf_counter()
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b'data: {"error"'):
                    raise Misbehaved(describe(body, r.status, r.headers, line, "error event"))
        if not done:
            raise Misbehaved(describe(body, r.status, r.headers, b"", "stream closed before data: [DONE]"))
        t = time.perf_counter()
        return (first or t) - t0, t - t0

    return one


async def read_events(session: Any, url: str, body: bytes) -> tuple[list[tuple[str, bytes]], bytes, Any]:
    """One streamed request read whole: its SSE events as (event name, data), the raw body, the response."""
    async with session.post(url, data=body, headers=JSON_HEADERS) as r:
        raw = await r.read()
        if r.status != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
            raise Misbehaved(describe(body, r.status, r.headers, raw, "not a 200 text/event-stream"))
    events = []
    for block in raw.decode().split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data).encode()))
    return events, raw, r


def check_ask(events: list[tuple[str, bytes]]) -> tuple[str, int]:
    """The native reply's text and the 1-based index of its first ``chunk`` event carrying text."""
    names = [n for n, _ in events]
    if "end" not in names:
        raise Misbehaved(f"native stream without an end event: {events}")
    chunks = [json.loads(d) for n, d in events if n == "chunk"]
    first = next((i for i, c in enumerate(chunks, 1) if c.get("text")), 0)
    return json.loads(events[names.index("end")][1])["content"], first


def check_compat(events: list[tuple[str, bytes]], stored: str | None) -> tuple[list[str], str, int]:
    """What in a compat stream differs from SPEC.md; its text; the index of the first content event."""
    problems: list[str] = []
    if not events or events[-1][1] != b"[DONE]":
        problems.append("last data is not [DONE]")
    chunks = [json.loads(d) for _, d in events if d != b"[DONE]"]
    if not chunks:
        return [*problems, "no chunks"], "", 0
    if {c.get("object") for c in chunks} != {"chat.completion.chunk"}:
        problems.append(f"objects {sorted({str(c.get('object')) for c in chunks})}")
    if {c.get("model") for c in chunks} != {"bench"} or len({c.get("id") for c in chunks}) != 1:
        problems.append("model is not the pool name, or the id changes between chunks")
    with_choices = [c for c in chunks if c.get("choices")]
    if not with_choices or with_choices[0]["choices"][0].get("delta", {}).get("role") != "assistant":
        problems.append("first delta has no role 'assistant'")
    finish = [c["choices"][0]["finish_reason"] for c in with_choices if c["choices"][0].get("finish_reason")]
    if finish != ["stop"]:
        problems.append(f"finish reasons {finish}, expected ['stop']")
    usage = chunks[-1]
    if usage.get("choices") != [] or not {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(
        usage.get("usage") or {}
    ):
        problems.append(f"last chunk is not choices == [] with usage: {usage}")
    text = "".join(c["choices"][0].get("delta", {}).get("content") or "" for c in with_choices)
    if stored is not None and text != stored:
        problems.append(f"deltas {text!r} != GET /v1/requests/{{id}} content {stored!r}")
    has_text = [bool(c.get("choices") and c["choices"][0].get("delta", {}).get("content")) for c in chunks]
    first = has_text.index(True) + 1 if True in has_text else 0
    return problems, text, first


async def preflight(session: Any, base: str) -> dict[str, Any]:
    """One request each way decoded in full; raises :class:`Misbehaved` on a compat stream off the spec."""
    ask_body, compat_body = ASK_BODY % PREFLIGHT_PROMPT, COMPAT_BODY % PREFLIGHT_PROMPT
    ask_events, ask_raw, _ = await read_events(session, f"{base}/v1/ask/bench", ask_body)
    ask_text, ask_first = check_ask(ask_events)
    events, raw, r = await read_events(session, f"{base}/v1/chat/completions", compat_body)
    stored = None
    if events and events[0][1] != b"[DONE]":
        rid = json.loads(events[0][1]).get("id")
        async with session.get(f"{base}/v1/requests/{rid}") as got:
            stored = (await got.json()).get("content") if got.status == 200 else None
    problems, text, first = check_compat(events, stored)
    if problems:
        raise Misbehaved(describe(compat_body, r.status, r.headers, raw, "; ".join(problems)))
    return {
        "ask_events": len(ask_events),
        "ask_bytes": len(ask_raw),
        "compat_events": len(events),
        "compat_bytes": len(raw),
        "same_reply": text == ask_text,
        "ask_first_event": ask_first,
        "compat_first_event": first,
    }


async def phase(one: One, args: argparse.Namespace, meters: Meters) -> dict[str, float]:
    """One closed-loop run and what it cost, per request."""
    c0 = await meters.now()
    res, elapsed = await closed_loop(args.conc, args.n, args.seconds, one)
    c1 = await meters.now()
    d = {k: c1[k] - c0[k] for k in c0}
    n = len(res)
    first = [r[0] * 1000 for r in res]
    last = [r[1] * 1000 for r in res]
    out = {"n": n, "rps": n / elapsed}
    out |= {"first_p50": pct(first, 50), "first_p99": pct(first, 99)}
    out |= {"last_p50": pct(last, 50), "last_p99": pct(last, 99)}
    out |= {f"{k}_cpu_ms": 1000 * d[k] / n for k in (*CPU_OF, "host")}
    out["host_busy_pct"] = 100 * d["host"] / d["wall"]
    out["others_pct"] = 100 * d["others"] / d["wall"]  # of all the host's cores
    out["redis_cmds"] = d["redis_cmds"] / n
    return out


async def measure(args: argparse.Namespace, port: int, meters: Meters) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        pre = await preflight(s, base)
        print(f"preflight: {json.dumps(pre)}", flush=True)
        ones = {
            "ask": ask_one(s, f"{base}/v1/ask/bench", pre["ask_first_event"]),
            "compat": compat_one(s, f"{base}/v1/chat/completions", pre["compat_first_event"]),
        }
        for side in SIDES:  # warm-up: connections, caches, both code paths
            await closed_loop(args.conc, args.warmup, 15, ones[side])
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for rnd in range(args.rounds):
            for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
                r = await phase(ones[side], args, meters)
                runs[side].append(r)
                print(
                    f"round {rnd + 1} {side:>6}: {r['rps']:.0f} req/s, end p50 {r['last_p50']:.2f} ms, "
                    f"p99 {r['last_p99']:.2f} ms, gateway {r['gateway_cpu_ms']:.3f} CPU ms/req, "
                    f"host {r['host_busy_pct']:.0f} % busy ({r['others_pct']:.0f} % others)",
                    flush=True,
                )
    return {"preflight": pre, "runs": runs}


async def measured(
    args: argparse.Namespace, env: dict[str, str], port: int, gateway: int, workers: list[int]
) -> dict[str, Any]:
    from agentpool.broker.redis_conn import connect

    redis = connect(env["AGENTPOOL_REDIS_URL"])
    try:
        return await measure(args, port, Meters(gateway, workers, redis, env))
    finally:
        await redis.aclose()


def environment(args: argparse.Namespace) -> dict[str, str]:
    cfg = Path(tempfile.mkdtemp()) / "bench.toml"
    cfg.write_text(
        CONFIG.format(
            ttft_ms=args.ttft_ms,
            reply_tokens=args.reply_tokens,
            concurrency=args.worker_concurrency,
            replicas=args.replicas,
        )
    )
    return {
        **os.environ,
        "AGENTPOOL_NAMESPACE": "bcompat" + secrets.token_hex(3),
        "AGENTPOOL_CONFIG": str(cfg),
        "AGENTPOOL_AMQP_URL": os.environ.get("AGENTPOOL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        "AGENTPOOL_REDIS_URL": os.environ.get("AGENTPOOL_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "AGENTPOOL_LOG_LEVEL": "WARNING",
        "AGENTPOOL_METRICS": os.environ.get("AGENTPOOL_METRICS", "1"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the system, measure, and always stop it and delete the namespace."""
    import uvloop

    env = environment(args)
    port = 18000 + secrets.randbelow(2000)
    procs = start_system(args, env, port)  # the replicas, then the gateway
    gateway, workers = procs[-1], procs[:-1]
    try:
        uvloop.run(wait_ready(env, port, args))
        return uvloop.run(measured(args, env, port, gateway.pid, [p.pid for p in workers]))
    finally:
        stop(procs)
        uvloop.run(cleanup(env))


KEYS = ("rps", "first_p50", "first_p99", "last_p50", "last_p99")


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per side; ratios compat/ask of the medians and, paired by round, their median."""
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    ratio = {k: med["compat"][k] / med["ask"][k] for k in (*KEYS, "gateway_cpu_ms", "host_cpu_ms")}
    paired = {
        k: statistics.median(c[k] / a[k] for a, c in zip(runs["ask"], runs["compat"], strict=True))
        for k in ("rps", "gateway_cpu_ms")
    }
    rps = [r["rps"] / a["rps"] for a, r in zip(runs["ask"], runs["compat"], strict=True)]
    within = ratio["rps"] >= 0.9 and ratio["gateway_cpu_ms"] <= 1.1
    return {
        "median": med,
        "ratio": ratio,
        "paired_ratio": paired,
        "rps_ratio_range": [min(rps), max(rps)],
        "within_10pct": within,
    }


def report(args: argparse.Namespace, result: dict[str, Any], s: dict[str, Any]) -> None:
    pre = result["preflight"]
    print(
        f"\nfake model reply_tokens={args.reply_tokens} ttft={args.ttft_ms} ms, {args.replicas} replica(s) x "
        f"{args.worker_concurrency}, {args.conc} in flight, medians of {args.rounds} alternating rounds "
        f"x {args.n} requests a side; events/bytes per response: ask {pre['ask_events']}/{pre['ask_bytes']}, "
        f"compat {pre['compat_events']}/{pre['compat_bytes']}"
    )
    print(
        "| endpoint | req/s | first content p50 / p99 ms | end p50 / p99 ms | CPU ms/req: gateway | workers "
        "| load generator | RabbitMQ | Redis | others | host busy (others) | Redis cmds/req |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for side in SIDES:
        m = s["median"][side]
        cpu = " | ".join(f"{m[f'{k}_cpu_ms']:.3f}" for k in CPU_OF)
        print(
            f"| {side} | {m['rps']:.0f} | {m['first_p50']:.2f} / {m['first_p99']:.2f} | "
            f"{m['last_p50']:.2f} / {m['last_p99']:.2f} | {cpu} | {m['host_busy_pct']:.0f} % "
            f"({m['others_pct']:.0f} %) | {m['redis_cmds']:.1f} |"
        )
    r = s["ratio"]
    print(
        f"| compat/ask | {r['rps']:.3f} | {r['first_p50']:.3f} / {r['first_p99']:.3f} | "
        f"{r['last_p50']:.3f} / {r['last_p99']:.3f} | {r['gateway_cpu_ms']:.3f} | | | | | | | |"
    )
    lo, hi = s["rps_ratio_range"]
    print(
        f"\ncompat/ask: throughput {r['rps']:.3f} (paired by round {s['paired_ratio']['rps']:.3f}, "
        f"{lo:.3f}-{hi:.3f}), gateway CPU/request {r['gateway_cpu_ms']:.3f} "
        f"(paired {s['paired_ratio']['gateway_cpu_ms']:.3f}); within 10 %: "
        f"{'yes' if s['within_10pct'] else 'NO'}"
    )
    others = max(s["median"][side]["others_pct"] for side in SIDES)
    if others > 10:
        print(
            f"note: {others:.0f} % of the host's CPU went to work that is not this bench's (another test "
            "run?): throughput and latency are noisy; CPU per request of the gateway much less so"
        )


def rounded(x: Any) -> Any:
    """``x`` with its floats to 4 decimals, for a JSON line a reader can scan."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conc", type=int, default=16, help="requests in flight, both sides")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each runs both sides)")
    ap.add_argument("--n", type=int, default=3000, help="requests per side per round (upper bound)")
    ap.add_argument("--seconds", type=float, default=15, help="time cap per side per round")
    ap.add_argument("--warmup", type=int, default=200, help="requests per side before the first round")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--worker-concurrency", type=int, default=16, help="prefetch per replica")
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--ttft-ms", type=float, default=0)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 300 requests, 50 warm-up: a smoke test")
    ap.add_argument("--json", help="also write the per-round results and the summary here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.n, args.warmup = 2, 300, 50
    args.via = "http"  # what bench/roundtrip.py's start_system and wait_ready read
    t0 = time.monotonic()
    try:
        result = run(args)
    except Misbehaved as e:
        sys.exit(f"compat bench: the endpoint misbehaved: {e}")
    summary = summarize(result["runs"])
    report(args, result, summary)
    line = {"bench": "compat", "conc": args.conc, "rounds": args.rounds, "n": args.n}
    line |= {"replicas": args.replicas, "reply_tokens": args.reply_tokens, "wall_s": time.monotonic() - t0}
    line |= {"preflight": result["preflight"], **summary}
    print(json.dumps(rounded(line)))
    if args.json:
        Path(args.json).write_text(json.dumps({**line, "runs": result["runs"], "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
