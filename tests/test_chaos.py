"""Chaos: SIGKILL a worker process under load; nothing is lost, nothing is answered twice."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from agentpool.shared.config import parse_config
from agentpool.shared.messages import MESSAGE_DECODER, End, Error, Restart, Start
from agentpool.workers.supervisor import Supervisor
from tests.conftest import EXAMPLE, System, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def pool_file(tmp_path: Path, **kw: object) -> tuple[Path, str]:
    params = dict(
        pool="p",
        replicas=3,
        concurrency=4,
        sticky_depth=3,
        max_depth=16,
        ttft_ms=20,
        tokens_per_s=300,
        reply_tokens=12,
        rescue_after_s=2,
        max_attempts=5,
    )
    params.update(kw)
    text = EXAMPLE.format(**params)
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path, text


@contextlib.asynccontextmanager
async def supervised(system: System, path: Path) -> AsyncIterator[Supervisor]:
    """A real supervisor (worker subprocesses) for the test's namespace, always stopped after."""
    sup = Supervisor(replace(system.settings, config_path=str(path)), system.config)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.async_run(stop))

    async def all_up() -> bool:
        await system.client.refresh_membership()
        return len(system.client.router.members("p")) == sum(
            d.replicas for d in system.config.pools["p"].deployments
        )

    try:
        await wait_until(all_up, 30, "supervised replicas ready")
        yield sup
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_sigkill_under_load_loses_nothing(make_system, tmp_path: Path) -> None:
    path, text = pool_file(tmp_path)
    system: System = await make_system(parse_config(text, str(path)), start=False)
    async with supervised(system, path) as sup:
        await _sigkill_under_load(system, sup)


async def _sigkill_under_load(system: System, sup: Supervisor) -> None:
    client = system.client
    threads = [f"chaos-{i}" for i in range(60)]
    done: dict[str, list[tuple[float, object]]] = {}
    sent: dict[str, list[str]] = collections.defaultdict(list)
    killed_at: list[float] = []

    async def lane(my_threads: list[str]) -> None:
        for t in my_threads:
            for k in range(5):
                events: list[tuple[float, object]] = []
                rid = None
                async for ev in client.stream("p", f"{t} message {k}", thread_id=t):
                    events.append((time.monotonic(), ev))
                    if isinstance(ev, Start):
                        rid = ev.request_id
                assert rid is not None
                sent[t].append(rid)
                done[rid] = events

    async def busy() -> bool:
        """100 answers in, and the victim's last heartbeat says it runs requests (on a loaded
        machine the router may leave a replica whose heartbeat lags idle for a while)."""
        if len(done) < 100:
            return False
        return any(r.id == "p-main-2" and r.in_flight > 0 for r in await client.registry.replicas("p"))

    async def killer() -> None:
        await wait_until(busy, 60, "100 answers, and requests in flight on the victim")
        victim = sup.replicas[("p", "main", 2)].proc
        assert victim is not None
        os.kill(victim.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    # When 300 requests run at concurrency 30 and one replica is SIGKILLed mid-run
    await asyncio.gather(killer(), *(lane(threads[i::30]) for i in range(30)))

    # Then every request has exactly one complete answer
    assert len(done) == 300
    assert all(isinstance(evs[-1][1], End) for evs in done.values())
    for rid in done:
        entries = await client.redis.xrange(client.names.reply(rid))
        kinds = collections.Counter(f[b"t"] for _, f in entries)
        assert kinds[b"end"] == 1 and kinds[b"error"] == 0, (rid, kinds)
    # and every thread's history holds its 5 turns once each, in order
    for t, rids in sent.items():
        turns = [
            MESSAGE_DECODER.decode(b)
            for b in await client.redis.lrange(client.names.thread("default", t), 0, -1)
        ]
        assert [x.request_id for x in turns] == [r for r in rids for _ in (0, 1)], t
        assert [x.role for x in turns] == ["user", "assistant"] * 5
    # The killed replica's requests were restarted elsewhere (or by its replacement)
    rescued = {rid: evs for rid, evs in done.items() if any(isinstance(e, Restart) for _, e in evs)}
    assert rescued, "the kill hit no in-flight request"
    rescue_s = [
        next(ts for ts, e in evs if isinstance(e, Restart)) - killed_at[0] for evs in rescued.values()
    ]
    print(
        f"\nchaos: {len(rescued)} request(s) restarted after the SIGKILL; time to rescue "
        f"median {statistics.median(rescue_s):.2f}s max {max(rescue_s):.2f}s"
    )
    assert max(rescue_s) < 10
    # A replacement came up under the same replica id
    await wait_until(
        lambda: (
            ("p", "main", 2) in sup.replicas
            and sup.replicas[("p", "main", 2)].proc is not None
            and sup.replicas[("p", "main", 2)].proc.returncode is None
        ),
        10,
        "replacement",
    )


async def test_poison_request_is_parked_and_the_pool_keeps_serving(make_system, tmp_path: Path) -> None:
    path, text = pool_file(tmp_path, replicas=1, max_attempts=3)
    text = text.replace('kind = "fake"', 'kind = "fake"\ncrash_marker = "__crash__"')
    path.write_text(text)
    system: System = await make_system(parse_config(text, str(path)), start=False)
    async with supervised(system, path):
        await _poison(system)


async def _poison(system: System) -> None:
    client = system.client
    # When a request kills its worker every time it runs
    events = [ev async for ev in client.stream("p", "please __crash__ now", thread_id="poison")]
    # Then after max_attempts it ends with an error event, and is parked
    final = events[-1]
    assert isinstance(final, Error) and final.error_code == "REQUEST_POISONED", final
    assert sum(isinstance(e, Restart) for e in events) == 2  # attempts 2 and 3 were restarts
    ch = await client.amqp.channel()
    raw = await ch.get_underlay_channel()
    parked = await raw.queue_declare(client.names.parking_queue("p"), passive=True)
    assert parked.message_count == 1
    await ch.close()
    # and the pool keeps serving
    await wait_until(lambda: bool(client.router.members("p")), 30, "replica back")
    reply = await client.ask("p", "are you alive?", thread_id="after-poison")
    assert isinstance(reply, End)
