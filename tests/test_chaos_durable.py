"""Chaos under load against the Redis configuration agentpool ships (deploy/redis/redis.conf).

Two gateway processes, a supervisor with worker processes, a throwaway Redis (AOF, everysec)
and a throwaway RabbitMQ node (tests/servers.py). While ~100 threads send requests, mostly SSE
streams, some with an Idempotency-Key, some answered by webhook, every call with an API key:
a worker is SIGKILLed, Redis is shut down and started, then SIGKILLed and started, RabbitMQ's
app is stopped and started, and a gateway is SIGKILLed mid-stream (its clients resume on the
other gateway with ``Last-Event-ID``, or repeat the POST with the same Idempotency-Key).

Contract checked: every accepted request (one that got a request id) ends with exactly one final
answer; each thread holds each of its turns once, in order; every key still authenticates; every
accepted webhook reaches the receiver (deduplicated by X-Request-ID); every idempotent repeat
answers the first request; every stream's chunks after its last ``restart`` make its ``end``'s
content. A call refused with a clear error while a dependency was down was never accepted and
is counted apart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentpool.shared.config import parse_config
from agentpool.shared.messages import MESSAGE_DECODER
from agentpool.shared.settings import Settings
from agentpool.workers.supervisor import Supervisor
from tests.api_helpers import Receiver, h, make_key, receiver
from tests.conftest import System, free_port, subprocess_env, wait_until
from tests.servers import RabbitNode, RedisServer
from tests.test_chaos import pool_file, supervised

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

EXTRA = """
[rate_limit]
requests_per_minute = 0

[webhooks]
allow_hosts = ["127.0.0.1"]
retry_base_s = 0.2
retry_max_s = 2
max_attempts = 30
timeout_s = 2
"""
LANES, THREADS_PER_LANE, MIN_ROUNDS = 20, 5, 5  # 100 threads, >= 500 calls
THINK_S = 0.6  # between a lane's calls
CALL_DEADLINE_S = 60.0
FINAL = {"end", "error", "interrupt"}
OUTAGE_S = 2.0  # how long a stopped dependency stays down once the gateways report it
STALE_GRACE_S = 1.0  # a 503 REDIS_UNAVAILABLE later than this after Redis is back is a bug
SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def settings(own_settings: Settings) -> Settings:
    return replace(own_settings, auth="required")  # every call carries one of the keys


@dataclass
class Call:
    """One logical request, as its client saw it."""

    n: int
    thread: str
    kind: str  # sse | json | webhook
    body: dict[str, Any]
    key: str
    idem: str | None
    request_id: str | None = None
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (id, type, data)
    answer: dict[str, Any] | None = None  # the end event, the JSON answer, or the result read back
    failed: dict[str, Any] | None = None  # a final error answer
    refused: Counter[str] = field(default_factory=Counter)  # clear errors before acceptance
    ambiguous: int = 0  # POSTs that broke after they were sent and before an answer
    resumes: int = 0
    streaming_on: int | None = None  # the gateway of an SSE stream in progress
    gave_up: str = ""
    sent_at: float = 0.0  # when its latest POST was sent (monotonic)
    replayed: bool = False  # accepted by a repeat of a POST that broke (Idempotent-Replayed)

    @property
    def headers(self) -> dict[str, str]:
        return {**h(self.key), **({"Idempotency-Key": self.idem} if self.idem else {})}


class Cluster:
    """The gateways (processes) and the clients' view of them."""

    def __init__(self, urls: list[str], procs: list[asyncio.subprocess.Process]) -> None:
        self.urls = urls
        self.procs = procs
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(30, connect=2), limits=httpx.Limits(max_connections=200)
        )

    def url(self, i: int) -> str:
        return self.urls[i % len(self.urls)]

    async def ready(self) -> bool:
        """Every gateway still running says ready."""
        for url, proc in zip(self.urls, self.procs, strict=True):
            if proc.returncode is not None:
                continue
            try:
                if (await self.http.get(f"{url}/readyz")).status_code != 200:
                    return False
            except httpx.TransportError:
                return False
        return True

    async def reports_down(self, dependency: str) -> bool:
        for url, proc in zip(self.urls, self.procs, strict=True):
            if proc.returncode is None:
                with contextlib.suppress(httpx.TransportError):
                    r = await self.http.get(f"{url}/readyz")
                    if r.status_code == 503 and r.json()["dependencies"][dependency] is False:
                        return True
        return False


class Clients:
    """The load: lanes of sequential calls, each lane on a few threads of its own."""

    def __init__(self, cluster: Cluster, keys: list[str], hook: Receiver) -> None:
        self.cluster = cluster
        self.keys = keys
        self.hook = hook
        self.calls: list[Call] = []
        self.refusals: list[tuple[float, float, str, int]] = []  # (sent, answered, status + code, call)
        self.chaos_done = asyncio.Event()
        self._n = itertools.count()

    def answered(self) -> int:
        return sum(c.answer is not None for c in self.calls)

    def streaming_on(self, gateway: int) -> int:
        return sum(c.streaming_on == gateway for c in self.calls)

    async def lane(self, lane: int) -> None:
        threads = [f"th-{lane}-{k}" for k in range(THREADS_PER_LANE)]
        for rnd in itertools.count():
            if rnd >= MIN_ROUNDS and self.chaos_done.is_set():
                return
            for t in threads:
                call = self._call(t, rnd, lane)
                self.calls.append(call)
                try:
                    async with asyncio.timeout(CALL_DEADLINE_S):
                        await getattr(self, call.kind)(call, lane)
                except TimeoutError:
                    call.gave_up = f"no final answer within {CALL_DEADLINE_S:.0f}s"
                call.streaming_on = None
                if call.answer is None and call.failed is None:
                    return  # the thread's next turn would not follow this one: stop the lane
                await asyncio.sleep(THINK_S)

    def _call(self, thread: str, rnd: int, lane: int) -> Call:
        n = next(self._n)
        kind = {5: "json", 6: "webhook"}.get(n % 8, "sse")
        idem = f"idem-{thread}-{rnd}" if kind != "sse" or n % 8 == 3 else None
        body: dict[str, Any] = {"content": f"{thread} round {rnd}", "thread_id": thread}
        if kind == "webhook":
            body["webhook_url"] = self.hook.url
        return Call(n, thread, kind, body, self.keys[n % len(self.keys)], idem)

    # --- one call, by kind
    async def sse(self, call: Call, lane: int) -> None:
        gw = lane
        while call.request_id is None:
            try:
                call.sent_at = time.monotonic()
                async with self.cluster.http.stream(
                    "POST",
                    f"{self.cluster.url(gw)}/v1/ask/p",
                    json=call.body,
                    headers={**call.headers, **SSE},
                ) as r:
                    if r.status_code != 200:
                        await self._refused(call, r)
                        continue
                    call.request_id, call.streaming_on = r.headers["x-request-id"], gw % 2
                    call.replayed = r.headers.get("idempotent-replayed") == "true"
                    if await self._read(r, call):
                        return
            except httpx.TransportError as e:
                if call.request_id is not None:
                    break  # accepted, then the stream broke: resume it
                gw = await self._broke(call, e, gw)
        await self._resume(call, gw + 1)

    async def _resume(self, call: Call, gw: int) -> None:
        """Read the rest of the stream after the last event seen, on any gateway."""
        while True:
            call.resumes += 1
            headers = {**h(call.key), **SSE}
            if call.events:
                headers["Last-Event-ID"] = call.events[-1][0]
            try:
                url = f"{self.cluster.url(gw)}/v1/requests/{call.request_id}"
                async with self.cluster.http.stream("GET", url, headers=headers) as r:
                    if r.status_code == 200:
                        call.streaming_on = gw % 2
                        if await self._read(r, call):
                            return
                    else:  # 404 until a replica begins it; 503 while a dependency is down
                        call.refused[f"resume {r.status_code}"] += 1
                        await r.aread()
            except httpx.TransportError:
                pass
            gw += 1
            await asyncio.sleep(0.2)

    async def _read(self, r: httpx.Response, call: Call) -> bool:
        """The SSE events of ``r`` into ``call.events``; True once the final one came."""
        eid, kind, data = "", "", []
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                eid = line[4:]
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and kind:
                event = json.loads("\n".join(data))
                call.events.append((eid, kind, event))
                if kind in FINAL:
                    if kind == "end":
                        call.answer = event
                    else:
                        call.failed = event
                    return True
                eid, kind, data = "", "", []
        return False

    async def _post(self, call: Call, gw: int) -> tuple[httpx.Response, int]:
        """POST the call's ask, moving to the other gateway when a connection breaks -> (answer, gw)."""
        while True:
            try:
                call.sent_at = time.monotonic()
                r = await self.cluster.http.post(
                    f"{self.cluster.url(gw)}/v1/ask/p", json=call.body, headers=call.headers
                )
                return r, gw
            except httpx.TransportError as e:
                gw = await self._broke(call, e, gw)

    async def json(self, call: Call, lane: int) -> None:
        gw = lane
        while True:
            r, gw = await self._post(call, gw)
            if r.status_code == 200:
                call.answer = r.json()
                call.request_id = call.answer["request_id"]
                call.replayed = r.headers.get("idempotent-replayed") == "true"
                return
            if r.status_code in (502, 504) and "x-request-id" in r.headers:
                call.request_id, call.failed = r.headers["x-request-id"], r.json()
                return
            await self._refused(call, r)

    async def webhook(self, call: Call, lane: int) -> None:
        gw = lane
        while call.request_id is None:
            r, gw = await self._post(call, gw)
            if r.status_code == 202:
                call.request_id = r.json()["request_id"]
                call.replayed = r.headers.get("idempotent-replayed") == "true"
            else:
                await self._refused(call, r)
        while True:  # the result read back, so the thread's next turn follows this one
            with contextlib.suppress(httpx.TransportError):
                url = f"{self.cluster.url(gw)}/v1/requests/{call.request_id}"
                r = await self.cluster.http.get(url, headers=h(call.key))
                if r.status_code == 200:
                    call.answer = r.json()
                    return
                if r.status_code in (502, 504):
                    call.failed = r.json()
                    return
            gw += 1
            await asyncio.sleep(0.2)

    async def _refused(self, call: Call, r: httpx.Response) -> None:
        await r.aread()
        try:
            code = r.json().get("error_code", "")
        except ValueError:
            code = ""
        what = f"{r.status_code} {code}".strip()
        call.refused[what] += 1
        self.refusals.append((call.sent_at, time.monotonic(), what, call.n))
        await asyncio.sleep(0.3)

    async def _broke(self, call: Call, e: httpx.TransportError, gw: int) -> int:
        """A POST that failed: never sent (connect), or maybe published (after it was sent)."""
        if not isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            call.ambiguous += 1
        call.refused[type(e).__name__] += 1
        await asyncio.sleep(0.2)
        return gw + 1


@contextlib.asynccontextmanager
async def gateways(settings: Settings, path: Path, logs: Path, n: int = 2) -> AsyncIterator[Cluster]:
    """``n`` ``agentpool gateway`` processes, ready; always killed after."""
    env = {**subprocess_env(settings, path), "AGENTPOOL_LOG_LEVEL": "WARNING"}
    ports = [free_port() for _ in range(n)]
    procs = []
    try:
        for i, port in enumerate(ports):
            with (logs / f"gateway-{i}.log").open("wb") as out:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "agentpool",
                        "gateway",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        env=env,
                        stdout=out,
                        stderr=out,
                    )
                )
        cluster = Cluster([f"http://127.0.0.1:{p}" for p in ports], procs)
        try:
            await wait_until(cluster.ready, 30, "gateways ready")
            yield cluster
        finally:
            await cluster.http.aclose()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


@dataclass
class Chaos:
    """The faults, one after another, each once the system serves again after the last."""

    clients: Clients
    cluster: Cluster
    sup: Supervisor
    redis: RedisServer
    rabbit: RabbitNode
    log: list[str] = field(default_factory=list)
    down: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: collections.defaultdict(list))
    faults: list[tuple[float, str]] = field(default_factory=list)  # (when it began, what)

    async def run(self) -> None:
        t0 = time.monotonic()
        await self._serving(60, "warm-up")
        await self.step("SIGKILL worker p-main-2", self._kill_worker, None)
        await self.step("Redis SHUTDOWN + start", self.redis.stop, "redis", self.redis.start)
        await self.step("Redis SIGKILL + start", self.redis.kill, "redis", self.redis.start)
        await self.step(
            "RabbitMQ stop_app + start_app", self.rabbit.stop_app, "rabbitmq", self.rabbit.start_app
        )
        await self.step("SIGKILL gateway 1 mid-stream", self._kill_gateway, None)
        self.log.append(f"chaos done after {time.monotonic() - t0:.1f}s")
        self.clients.chaos_done.set()

    async def step(self, what: str, fault: Any, down: str | None, back: Any = None) -> None:
        t = time.monotonic()
        self.faults.append((t, what))
        if asyncio.iscoroutinefunction(fault):
            await fault()
        else:  # a server's stop or kill: blocking calls
            await asyncio.to_thread(fault)
        if down is not None:  # the gateways saw it: /readyz names the dependency
            await wait_until(lambda: self.cluster.reports_down(down), 15, f"/readyz to report {down} down")
            await asyncio.sleep(OUTAGE_S)  # calls meet the outage, and streams stall mid-way
            await asyncio.to_thread(back)
        t_back = time.monotonic()
        if down is not None:
            self.down[down].append((t, t_back))
        await wait_until(self.cluster.ready, 60, f"ready after {what}")
        t_ready = time.monotonic()
        await self._serving(20, what)
        self.log.append(
            f"{what}: down {t_back - t:.2f}s; /readyz 200 {t_ready - t_back:.2f}s and 20 more answers "
            f"{time.monotonic() - t_back:.2f}s after it was back"
        )

    async def _serving(self, more: int, what: str) -> None:
        want = self.clients.answered() + more
        await wait_until(lambda: self.clients.answered() >= want, 60, f"{more} answers after {what}")

    async def _kill_worker(self) -> None:
        proc = self.sup.replicas[("p", "main", 2)].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)

    async def _kill_gateway(self) -> None:
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: self.clients.streaming_on(1) >= 3, 20, "streams open on gateway 1")
        self.log.append(f"gateway 1 killed with {self.clients.streaming_on(1)} streams open on it")
        os.kill(self.cluster.procs[1].pid, signal.SIGKILL)


async def test_chaos_under_load_loses_nothing(
    make_system, own_redis: RedisServer, own_rabbit: RabbitNode, tmp_path: Path, monkeypatch
) -> None:
    started = time.monotonic()
    monkeypatch.setenv("AGENTPOOL_LOG_LEVEL", "ERROR")  # the workers' (the gateways log to tmp_path)
    # 12 tokens at 60/s: ~0.2 s a reply, so kills and restarts land mid-stream
    path, text = pool_file(tmp_path, tokens_per_s=60, max_attempts=8)
    path.write_text(text + EXTRA)
    system: System = await make_system(parse_config(path.read_text(), str(path)), start=False)
    keys = [(await make_key(system, "default", "ask"))[1] for _ in range(4)]
    async with (
        receiver() as hook,
        supervised(system, path) as sup,
        gateways(system.settings, path, tmp_path) as cluster,
    ):
        clients = Clients(cluster, keys, hook)
        chaos = Chaos(clients, cluster, sup, own_redis, own_rabbit)
        t_load = time.monotonic()
        # When ~100 threads send calls through two gateways while the faults happen one by one
        await asyncio.gather(chaos.run(), *(clients.lane(i) for i in range(LANES)))
        load_s = time.monotonic() - t_load
        report = await Verdict(system, clients, hook, chaos).check(cluster, keys)
    print(f"\nchaos (durable): {load_s:.1f}s of load, {time.monotonic() - started:.1f}s in all")
    for line in [*chaos.log, *report.figures]:
        print(f"  {line}")
    # Then nothing was lost, duplicated or wiped (each problem names its request ids)
    assert not report.problems, "\n".join(report.problems)


@dataclass
class Report:
    figures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


class Verdict:
    """The checks after the run, against what Redis holds and what the clients saw."""

    def __init__(self, system: System, clients: Clients, hook: Receiver, chaos: Chaos) -> None:
        self.chaos = chaos
        self.redis = system.client.redis
        self.names = system.client.names
        self.clients = clients
        self.hook = hook
        self.report = Report()
        self.accepted = [c for c in clients.calls if c.request_id is not None]

    async def check(self, cluster: Cluster, keys: list[str]) -> Report:
        await self.finals()
        self.streams()
        await self.threads()
        await self.keys(cluster, keys)
        self.stale_refusals()
        await self.webhooks_and_replays(cluster)
        self.figures()
        return self.report

    async def finals(self) -> None:
        """Exactly one final event per accepted request, in Redis and as the client saw it."""
        rep = self.report
        for c in self.clients.calls:
            rep.expect(
                not c.gave_up,
                f"call {c.n} ({c.kind}, {c.request_id}, accepted by a replay: {c.replayed}): {c.gave_up}; "
                f"before: {dict(c.refused)}",
            )
        for c in self.accepted:
            entries = await self.redis.xrange(self.names.reply(c.request_id))
            kinds = Counter(f[b"t"].decode() for _, f in entries)
            finals = {k: n for k, n in kinds.items() if k in FINAL}
            rep.expect(finals == {"end": 1}, f"request {c.request_id} ({c.kind}): final events {finals}")
            if c.answer is not None and kinds["end"]:
                end = json.loads(next(f[b"d"] for _, f in entries if f[b"t"] == b"end"))
                rep.expect(
                    c.answer.get("content") == end["content"],
                    f"request {c.request_id} ({c.kind}): the client got other content than the end event",
                )
            rep.expect(c.failed is None, f"request {c.request_id} ({c.kind}) failed: {c.failed}")
            seen = Counter(kind for _, kind, _ in c.events if kind in FINAL)
            rep.expect(sum(seen.values()) <= 1, f"request {c.request_id}: the client saw finals {seen}")

    def streams(self) -> None:
        """Each SSE stream: no event twice, and the chunks after its last restart make its end."""
        for c in self.accepted:
            if c.kind != "sse" or c.answer is None:
                continue
            ids = [eid for eid, _, _ in c.events]
            self.report.expect(len(ids) == len(set(ids)), f"request {c.request_id}: an event id came twice")
            kinds = [kind for _, kind, _ in c.events]
            last = max((i for i, k in enumerate(kinds) if k == "restart"), default=-1)
            text = "".join(d["text"] for _, k, d in c.events[last + 1 :] if k == "chunk")
            self.report.expect(
                text == c.answer["content"],
                f"request {c.request_id}: chunks after the last restart {text!r} != end.content "
                f"{c.answer['content']!r} (events {kinds}, resumed {c.resumes}x)",
            )

    async def threads(self) -> None:
        """Each thread holds its answered turns once each, in order (user then assistant)."""
        by_thread: dict[str, list[Call]] = collections.defaultdict(list)
        for c in self.clients.calls:
            by_thread[c.thread].append(c)
        self.orphans = 0
        for thread, calls in by_thread.items():
            raw = await self.redis.lrange(self.names.thread("default", thread), 0, -1)
            turns = [MESSAGE_DECODER.decode(b) for b in raw]
            want = [c.request_id for c in calls if c.answer is not None]
            mine = set(want)
            got = [(t.request_id, t.role) for t in turns if t.request_id in mine]
            expected = [(rid, role) for rid in want for role in ("user", "assistant")]
            self.report.expect(got == expected, f"thread {thread}: turns {got} != expected {expected}")
            orphans = {t.request_id for t in turns} - mine
            self.orphans += len(orphans)
            ambiguous = sum(c.ambiguous for c in calls if c.idem is None)
            self.report.expect(
                len(orphans) <= ambiguous,
                f"thread {thread}: turns of requests no client was told of: {sorted(orphans)}",
            )

    async def keys(self, cluster: Cluster, keys: list[str]) -> None:
        """Every key still authenticates (and none was refused as invalid during the run)."""
        rid = self.accepted[0].request_id
        for key in keys:
            r = await cluster.http.get(f"{cluster.urls[0]}/v1/requests/{rid}", headers=h(key))
            self.report.expect(r.status_code == 200, f"key {key[:12]}...: {r.status_code} {r.text}")
        refused = [
            c.request_id or c.n for c in self.clients.calls if any(k.startswith("401") for k in c.refused)
        ]
        self.report.expect(not refused, f"valid keys got 401 during the run on calls {refused}")

    def stale_refusals(self) -> None:
        """503 REDIS_UNAVAILABLE is a fair answer to a POST in flight while Redis is down, not to
        one sent once it is back."""
        windows = self.chaos.down["redis"]
        late = [
            (n, round(min((sent - back for _, back in windows if sent > back), default=-1.0), 2))
            for sent, answered, what, n in self.clients.refusals
            if what == "503 REDIS_UNAVAILABLE"
            and not any(start <= answered and sent <= back + STALE_GRACE_S for start, back in windows)
        ]
        self.report.figures.append(f"503 REDIS_UNAVAILABLE to POSTs sent while Redis was up: {len(late)}")
        self.report.expect(
            not late,
            f"{len(late)} POSTs sent more than {STALE_GRACE_S}s after Redis was back got 503 "
            f"REDIS_UNAVAILABLE (call, sent seconds after): {late[:10]}",
        )

    async def webhooks_and_replays(self, cluster: Cluster) -> None:
        hooked = {c.request_id for c in self.accepted if c.kind == "webhook"}

        def delivered() -> set[str]:
            return {d.headers["x-request-id"] for d in self.hook.deliveries}

        with contextlib.suppress(AssertionError):
            await wait_until(lambda: hooked <= delivered(), 40, "every webhook delivered")
        self.report.expect(hooked <= delivered(), f"webhooks never delivered: {sorted(hooked - delivered())}")
        answers = {c.request_id: c.answer for c in self.accepted if c.kind == "webhook"}
        for d in self.hook.deliveries:
            got, answer = json.loads(d.body), answers.get(d.headers["x-request-id"])
            self.report.expect(
                answer is not None and got["status"] == "completed" and got["content"] == answer["content"],
                f"webhook for {d.headers['x-request-id']}: {got.get('status')} {got.get('error')}, "
                "not the request's answer",
            )
        self.replays = await self.replay(cluster)
        await asyncio.sleep(0.5)  # a repeat must not deliver again
        per_id = Counter(d.headers["x-request-id"] for d in self.hook.deliveries)
        self.hook_dupes = {rid: self._dupe(rid) for rid, n in per_id.items() if n > 1}
        # a delivery repeats only as a later attempt (its gateway died mid-attempt, or the receiver
        # failed): the same attempt posted twice would be two gateways delivering it at once
        for rid in self.hook_dupes:
            attempts = [
                int(d.headers["x-webhook-attempt"])
                for d in self.hook.deliveries
                if d.headers["x-request-id"] == rid
            ]
            self.report.expect(attempts == sorted(set(attempts)), f"webhook {rid} attempts {attempts}")
        self.report.expect(set(per_id) <= hooked, f"webhooks for unknown requests: {set(per_id) - hooked}")

    def _dupe(self, rid: str) -> str:
        """A repeated delivery: its attempt numbers, the seconds between them, the fault before."""
        ds = [d for d in self.hook.deliveries if d.headers["x-request-id"] == rid]
        before = [what for t, what in self.chaos.faults if t <= ds[-1].at]
        attempts = ",".join(d.headers.get("x-webhook-attempt", "?") for d in ds)
        after = before[-1] if before else "none"
        return f"attempts {attempts}, {ds[-1].at - ds[0].at:.1f}s apart, after {after}"

    async def replay(self, cluster: Cluster) -> int:
        """Every idempotent call, repeated now: the first request's id and content."""
        calls = [c for c in self.accepted if c.idem is not None]
        gate = asyncio.Semaphore(10)

        async def one(c: Call) -> None:
            async with gate:
                r = await cluster.http.post(f"{cluster.urls[0]}/v1/ask/p", json=c.body, headers=c.headers)
            want = 202 if c.kind == "webhook" else 200
            ok = r.status_code == want and r.json()["request_id"] == c.request_id
            if ok and want == 200:
                assert c.answer is not None
                ok = r.json()["content"] == c.answer["content"]
            self.report.expect(ok, f"replay of {c.request_id} ({c.kind}): {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(one(c) for c in calls))
        return len(calls)

    def figures(self) -> None:
        calls, acc = self.clients.calls, self.accepted
        kinds = Counter(c.kind for c in acc)
        refused = sum((c.refused for c in calls), Counter())
        rescued = sum(any(k == "restart" for _, k, _ in c.events) for c in acc)
        self.report.figures += [
            f"calls {len(calls)} on {len({c.thread for c in calls})} threads; accepted {len(acc)} "
            f"({dict(kinds)}); answered {self.clients.answered()}",
            f"refused or broken attempts before acceptance: {dict(refused)}",
            f"SSE streams resumed with Last-Event-ID: {sum(c.resumes > 0 for c in acc)}; "
            f"streams with a restart event (rescued): {rescued}",
            f"POSTs broken after sending: {sum(c.ambiguous for c in calls)}; orphan turns: {self.orphans}",
            f"idempotent replays: {self.replays}; webhook deliveries {len(self.hook.deliveries)} for "
            f"{kinds['webhook']} webhooks, duplicates {self.hook_dupes or 'none'}",
        ]
