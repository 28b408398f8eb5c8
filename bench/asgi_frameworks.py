#!/usr/bin/env python
"""Starlette vs Litestar micro-benchmark (self-contained).

Each framework is served by uvicorn (loop=uvloop, http=httptools, 1 worker,
access log off) in its own subprocess on 127.0.0.1 with a kernel-chosen free
port.  The load generator (aiohttp, keep-alive) runs in yet another subprocess
per run, bounded by a request count AND a hard time cap.

Endpoints (identical semantics in both apps):
  POST /v1/ask/{pool}     body {"content": "...", "thread_id": "..."} -> small JSON
  GET  /v1/stream/{pool}  text/event-stream, 20 x "event: chunk\\ndata: {...}\\n\\n"

Reported per framework x endpoint x concurrency (median of --runs runs):
  req/s, p50/p99 latency (full response, incl. the whole SSE stream),
  server CPU seconds per 1000 requests (from /proc/<pid>/stat),
  load-generator CPU utilisation (if ~100% the client is the bottleneck),
  and Litestar/Starlette ratios measured in the same invocation.

Usage:
  .venv/bin/python bench/asgi_frameworks.py [--requests 3000] [--runs 3]
      [--conc 16,64] [--cap 30] [--budget 280] [--no-pin] [--json out.json]
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import msgspec

SSE_EVENTS = 20
HERE = os.path.abspath(__file__)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# Shared schema (module level so Litestar can resolve the type hints)
# --------------------------------------------------------------------------
class Ask(msgspec.Struct):
    content: str
    thread_id: str


class Answer(msgspec.Struct):
    pool: str
    thread_id: str
    answer: str
    chars: int


class Chunk(msgspec.Struct):
    i: int
    delta: str


_enc = msgspec.json.Encoder()
_ask_dec = msgspec.json.Decoder(Ask)


def _make_answer(pool: str, req: Ask) -> Answer:
    return Answer(pool=pool, thread_id=req.thread_id, answer="ok: " + req.content, chars=len(req.content))


# --------------------------------------------------------------------------
# Apps
# --------------------------------------------------------------------------
def build_starlette():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def ask(request: Request) -> Response:
        try:
            req = _ask_dec.decode(await request.body())
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return Response(_enc.encode({"error": str(exc)}), status_code=400, media_type="application/json")
        body = _enc.encode(_make_answer(request.path_params["pool"], req))
        return Response(body, media_type="application/json")

    async def sse_gen() -> AsyncIterator[bytes]:
        for i in range(SSE_EVENTS):
            yield b"event: chunk\ndata: " + _enc.encode(Chunk(i=i, delta="tok")) + b"\n\n"

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(
            sse_gen(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    return Starlette(
        routes=[
            Route("/v1/ask/{pool}", ask, methods=["POST"]),
            Route("/v1/stream/{pool}", stream, methods=["GET"]),
        ]
    )


def build_litestar():
    from litestar import Litestar, get, post
    from litestar.response import Stream

    @post("/v1/ask/{pool:str}", status_code=200)
    async def ask(pool: str, data: Ask) -> Answer:
        return _make_answer(pool, data)

    async def sse_gen() -> AsyncIterator[bytes]:
        for i in range(SSE_EVENTS):
            yield b"event: chunk\ndata: " + _enc.encode(Chunk(i=i, delta="tok")) + b"\n\n"

    @get("/v1/stream/{pool:str}")
    async def stream(pool: str) -> Stream:
        return Stream(sse_gen(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return Litestar(route_handlers=[ask, stream], openapi_config=None, debug=False)


# --------------------------------------------------------------------------
# Server subprocess
# --------------------------------------------------------------------------
def serve(framework: str, cpu: int | None) -> None:
    import uvicorn

    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    app = build_starlette() if framework == "starlette" else build_litestar()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # free port chosen by the kernel, no race
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
        lifespan="auto",
    )
    print(f"PORT {port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------
# Load-generator subprocess
# --------------------------------------------------------------------------
async def _load(url: str, kind: str, conc: int, n: int, cap: float) -> dict:
    import aiohttp

    body = msgspec.json.encode({"content": "hello", "thread_id": "abc"})
    headers = {"content-type": "application/json"}
    lat: list[float] = []
    errors = 0
    remaining = n
    pc = time.perf_counter
    connector = aiohttp.TCPConnector(limit=conc, limit_per_host=conc, use_dns_cache=True)
    timeout = aiohttp.ClientTimeout(total=cap)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        start = pc()
        deadline = start + cap

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0 and pc() < deadline:
                remaining -= 1
                t0 = pc()
                try:
                    if kind == "json":
                        async with s.post(url, data=body, headers=headers) as r:
                            b = await r.read()
                            ok = r.status == 200 and b.startswith(b"{")
                    else:
                        async with s.get(url) as r:
                            b = await r.read()
                            ok = r.status == 200 and b.count(b"event: chunk\n") == SSE_EVENTS
                except Exception:
                    ok = False
                if ok:
                    lat.append(pc() - t0)
                else:
                    errors += 1

        cpu0 = time.process_time()
        tasks = [asyncio.create_task(worker()) for _ in range(conc)]
        _, pending = await asyncio.wait(tasks, timeout=cap + 2)
        for t in pending:  # hard stop
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        wall = pc() - start
        cli_cpu = time.process_time() - cpu0
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "ok": len(lat),
        "errors": errors,
        "wall": wall,
        "rps": len(lat) / wall if wall else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "client_cpu_pct": 100 * cli_cpu / wall if wall else 0.0,
        "timed_out": wall >= cap,
    }


def load_main(url: str, kind: str, conc: int, n: int, cap: float, cpu: int | None) -> None:
    import uvloop

    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    res = uvloop.run(_load(url, kind, conc, n, cap))
    print(json.dumps(res), flush=True)


# --------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()  # skip "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


class Servers:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self, fw: str, cpu: int | None) -> None:
        cmd = [sys.executable, HERE, "_serve", fw] + ([f"--cpu={cpu}"] if cpu is not None else [])
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs[fw] = p
        line = p.stdout.readline().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{fw} server failed to start: {line!r}")
        port = int(line.split()[1])
        self.ports[fw] = port
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # wait until it accepts & answers HTTP
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"GET /v1/stream/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if c.recv(16).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{fw} server not ready")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)


def run_load(port: int, kind: str, conc: int, n: int, cap: float, cpu: int | None) -> dict:
    path = "/v1/ask/default" if kind == "json" else "/v1/stream/default"
    cmd = [sys.executable, HERE, "_load", f"http://127.0.0.1:{port}{path}", kind, str(conc), str(n), str(cap)]
    if cpu is not None:
        cmd.append(f"--cpu={cpu}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap + 20)
    except subprocess.TimeoutExpired:
        return {
            "ok": 0,
            "errors": n,
            "wall": cap,
            "rps": 0.0,
            "p50_ms": float("nan"),
            "p99_ms": float("nan"),
            "client_cpu_pct": 0.0,
            "timed_out": True,
        }
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conc", default="16,64")
    ap.add_argument("--cap", type=float, default=30.0, help="hard time cap per run (s)")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--budget", type=float, default=280.0, help="skip remaining runs after this many seconds")
    ap.add_argument("--no-pin", action="store_true", help="don't pin server->cpu0, client->cpu1")
    ap.add_argument("--json", help="also write raw results to this file")
    a = ap.parse_args()

    concs = [int(c) for c in a.conc.split(",")]
    fws = ["starlette", "litestar"]
    kinds = ["json", "sse"]
    ncpu = os.cpu_count() or 1
    pin = not a.no_pin and ncpu >= 2
    srv_cpu, cli_cpu = (0, 1) if pin else (None, None)

    from importlib.metadata import version

    import aiohttp
    import starlette
    import uvicorn

    print(
        f"python {sys.version.split()[0]} | starlette {starlette.__version__} | "
        f"litestar {version('litestar')} | "
        f"uvicorn {uvicorn.__version__} | msgspec {msgspec.__version__} | aiohttp {aiohttp.__version__} | "
        f"cpus {ncpu} | pinned {pin} | {a.requests} req/run, cap {a.cap}s, {a.runs} runs",
        flush=True,
    )

    t_start = time.monotonic()
    servers = Servers()
    results: dict[tuple[str, str, int], list[dict]] = {}

    def _sig(signum, frame):  # make Ctrl-C / SIGTERM still clean up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sig)
    try:
        for fw in fws:
            servers.start(fw, srv_cpu)
        for fw in fws:  # warmup, discarded
            for kind in kinds:
                run_load(servers.ports[fw], kind, max(concs), a.warmup, a.cap, cli_cpu)

        for rep in range(a.runs):
            order = fws if rep % 2 == 0 else fws[::-1]  # alternate to cancel drift
            for kind in kinds:
                for conc in concs:
                    for fw in order:
                        if time.monotonic() - t_start > a.budget:
                            print(f"!! budget {a.budget}s exceeded, skipping remaining runs", flush=True)
                            raise StopIteration
                        pid = servers.procs[fw].pid
                        c0 = proc_cpu_seconds(pid)
                        r = run_load(servers.ports[fw], kind, conc, a.requests, a.cap, cli_cpu)
                        c1 = proc_cpu_seconds(pid)
                        r["srv_cpu_s"] = c1 - c0
                        r["srv_cpu_per_1k"] = 1000 * (c1 - c0) / r["ok"] if r["ok"] else float("nan")
                        r["srv_cpu_pct"] = 100 * (c1 - c0) / r["wall"] if r["wall"] else 0.0
                        results.setdefault((fw, kind, conc), []).append(r)
                        print(
                            f"  run {rep + 1} {fw:9s} {kind:4s} c={conc:<3d} {r['rps']:8.0f} req/s "
                            f"p50 {r['p50_ms']:6.2f} p99 {r['p99_ms']:6.2f} ms  err {r['errors']}"
                            f"{'  TIMED-OUT' if r['timed_out'] else ''}",
                            flush=True,
                        )
    except StopIteration:
        pass
    finally:
        servers.stop_all()

    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print()
    print(
        "| endpoint | conc | framework | req/s | p50 ms | p99 ms | srv CPU s/1k req | srv CPU% "
        "| client CPU% | errors | n |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for kind in kinds:
        for conc in concs:
            for fw in fws:
                rs = results.get((fw, kind, conc))
                if not rs:
                    continue
                s = {
                    k: med(rs, k)
                    for k in ("rps", "p50_ms", "p99_ms", "srv_cpu_per_1k", "srv_cpu_pct", "client_cpu_pct")
                }
                s["errors"] = sum(r["errors"] for r in rs)
                s["n"] = len(rs)
                summary[(fw, kind, conc)] = s
                print(
                    f"| {kind} | {conc} | {fw} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                    f"{s['srv_cpu_per_1k']:.3f} | {s['srv_cpu_pct']:.0f} | {s['client_cpu_pct']:.0f} | "
                    f"{s['errors']} | {s['n']} |"
                )
    print()
    print("Litestar / Starlette (same invocation; >1 = Litestar higher)")
    print("| endpoint | conc | req/s | p50 | p99 | CPU/1k req |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        for conc in concs:
            s, lt = summary.get(("starlette", kind, conc)), summary.get(("litestar", kind, conc))
            if s and lt:
                print(
                    f"| {kind} | {conc} | {lt['rps'] / s['rps']:.2f} | {lt['p50_ms'] / s['p50_ms']:.2f} | "
                    f"{lt['p99_ms'] / s['p99_ms']:.2f} | {lt['srv_cpu_per_1k'] / s['srv_cpu_per_1k']:.2f} |"
                )
    print(f"\ntotal wall {time.monotonic() - t_start:.0f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"|".join(map(str, k)): v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        cpu = next((int(x.split("=")[1]) for x in sys.argv[3:] if x.startswith("--cpu=")), None)
        serve(sys.argv[2], cpu)
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        url, kind, conc, n, cap = sys.argv[2:7]
        cpu = next((int(x.split("=")[1]) for x in sys.argv[7:] if x.startswith("--cpu=")), None)
        load_main(url, kind, int(conc), int(n), float(cap), cpu)
    else:
        main()
