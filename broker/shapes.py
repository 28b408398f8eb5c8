"""Request shapes beyond one ask: best-of-N fan-out and escalation through a group's levels.

Fan-out publishes the same question N times on one thread, each run its own request (own id,
run index, seed) routed with the run index rotating the pool's order, so the runs land on
distinct replicas while the pool has enough. The runs read the thread and leave it as it was:
none of the N answers is the thread's next turn. Their reply streams are merged as they come;
``select="first"`` cancels the others once one ends, a deadline cancels what is still running
and reports it failed (``DEADLINE_EXCEEDED``) next to the results that made it.

Escalation asks a group's level and, when its run fails (an ``error`` event, including a
validator's ``ANSWER_REJECTED``, or a 503 at publish), asks the next level up with the same
thread and question; the answer lists every level that ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec

from agentpool.broker.streams import Subscription
from agentpool.shared.errors import Interrupted, NotFound, RequestFailed, Unavailable
from agentpool.shared.messages import EVENT_ENCODER, FINAL_TYPES, End, Error, Interrupt
from agentpool.shared.tasks import cancel_and_wait

if TYPE_CHECKING:
    from agentpool.broker.client import AgentPoolClient, Ticket

MAX_RUNS = 16
Entry = tuple[bytes, bytes, bytes]  # (stream entry id, event type, event JSON)
_SEED_STEP = 0x9E3779B1  # golden-ratio step: run seeds spread over the 31-bit range


def run_seed(seed: int, run: int) -> int:
    """The seed of run ``run`` of a fan-out seeded ``seed``."""
    return (seed + run * _SEED_STEP) & 0x7FFFFFFF


@dataclass(slots=True)
class Run:
    index: int
    ticket: Ticket
    sub: Subscription


class RunFailure(msgspec.Struct, kw_only=True):
    run: int
    request_id: str
    error_code: str
    error: str

    @classmethod
    def of(cls, run: int, error_event: bytes) -> RunFailure:
        err = msgspec.json.decode(error_event, type=Error)
        return cls(run=run, request_id=err.request_id, error_code=err.error_code, error=err.error)


@dataclass(slots=True)
class FanOutResult:
    thread_id: str
    results: list[tuple[int, End]] = field(default_factory=list)  # (run, answer), in the order they ended
    failed: list[RunFailure] = field(default_factory=list)
    # (run, request id) of the runs select="first" stopped
    cancelled: list[tuple[int, str]] = field(default_factory=list)


async def start_runs(
    client: AgentPoolClient,
    pool: str,
    content: str,
    n: int,
    *,
    thread_id: str | None = None,
    seed: int | None = None,
    **kwargs: object,
) -> list[Run]:
    """Publish ``n`` runs (all or none: a run refused at publish withdraws the ones before it)."""
    from agentpool.broker.client import new_id

    tid = thread_id or new_id()
    base = secrets.randbits(31) if seed is None else seed
    runs: list[Run] = []
    try:
        for i in range(n):
            sub, ticket = await client.submit_subscribed(
                pool, content, thread_id=tid, run=i, runs=n, seed=run_seed(base, i), **kwargs
            )
            runs.append(Run(i, ticket, sub))
    except BaseException:
        await withdraw(client, runs)
        raise
    return runs


async def withdraw(client: AgentPoolClient, runs: list[Run]) -> None:
    """Cancel published runs nobody will read (their agents drop or stop them)."""
    for r in runs:
        r.sub.close()
        if r.ticket.replica:
            client.router.finished(r.ticket.replica)
    await cancel_all(client, [r.ticket.request_id for r in runs])


async def cancel_all(client: AgentPoolClient, request_ids: list[str]) -> None:
    """Tell these requests to stop; one whose cancel cannot be written runs to its end, unread."""
    for rid in request_ids:
        with contextlib.suppress(Exception):
            await client.store.cancel(rid)


class Merged:
    """The runs' reply entries as ``(run, entry)``, interleaved as they arrive; ``KEEPALIVE``
    entries (run -1) when ``keepalive_s`` passes with none. After iteration: ``cancelled`` (by
    ``select="first"``) and ``expired`` (still running at the deadline, now cancelled)."""

    def __init__(
        self,
        client: AgentPoolClient,
        runs: list[Run],
        *,
        select: Literal["all", "first"] = "all",
        timeout_s: float | None = None,
        keepalive_s: float | None = None,
    ) -> None:
        self.client = client
        self.runs = runs
        self.select = select
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.keepalive_s = keepalive_s
        self.cancelled: list[Run] = []
        self.expired: list[Run] = []

    def __aiter__(self) -> AsyncGenerator[tuple[int, Entry], None]:
        return self.entries()

    async def entries(self) -> AsyncGenerator[tuple[int, Entry], None]:
        """Close it when done (``contextlib.aclosing``): closing stops reading the runs' streams."""
        from agentpool.broker.client import KEEPALIVE

        queue: asyncio.Queue[tuple[int, Entry | None]] = asyncio.Queue()

        async def pump(run: Run) -> None:
            try:
                async for entry in self.client.stream_raw(run.ticket, sub=run.sub):
                    await queue.put((run.index, entry))
            finally:
                queue.put_nowait((run.index, None))

        tasks = {r.index: asyncio.create_task(pump(r), name=f"run-{r.ticket.request_id}") for r in self.runs}
        open_runs = {r.index: r for r in self.runs}
        try:
            while open_runs:
                wait = self.keepalive_s
                if self.deadline is not None:
                    left = max(0.0, self.deadline - time.monotonic())
                    wait = left if wait is None else min(wait, left)
                try:
                    async with asyncio.timeout(wait):
                        index, entry = await queue.get()
                except TimeoutError:
                    if self.deadline is not None and time.monotonic() >= self.deadline:
                        self.expired = list(open_runs.values())
                        await self._stop(self.expired, tasks)
                        return
                    yield -1, KEEPALIVE
                    continue
                if entry is None:
                    open_runs.pop(index, None)
                    continue
                yield index, entry
                if entry[1] == b"end" and self.select == "first":
                    open_runs.pop(index, None)
                    self.cancelled = list(open_runs.values())
                    await self._stop(self.cancelled, tasks)
                    return
        finally:
            await cancel_and_wait(list(tasks.values()))

    def expired_failures(self) -> list[RunFailure]:
        """The runs the deadline stopped, as failures."""
        return [
            RunFailure(
                run=r.index,
                request_id=r.ticket.request_id,
                error_code="DEADLINE_EXCEEDED",
                error=f"run {r.index} had not ended by the fan-out's timeout_s",
            )
            for r in self.expired
        ]

    async def _stop(self, runs: list[Run], tasks: dict[int, asyncio.Task[None]]) -> None:
        await cancel_and_wait([tasks[r.index] for r in runs])
        await cancel_all(self.client, [r.ticket.request_id for r in runs])


async def fan_out(
    client: AgentPoolClient,
    pool: str,
    content: str,
    n: int,
    *,
    select: Literal["all", "first"] = "all",
    timeout_s: float | None = None,
    **kwargs: object,
) -> FanOutResult:
    """Run the question ``n`` times in parallel; every run's answer or failure."""
    runs = await start_runs(client, pool, content, n, **kwargs)  # type: ignore[arg-type]
    out = FanOutResult(thread_id=runs[0].ticket.thread_id)
    merged = Merged(client, runs, select=select, timeout_s=timeout_s)
    async with contextlib.aclosing(merged.entries()) as entries:
        async for index, (_id, kind, data) in entries:
            if kind == b"end":
                out.results.append((index, msgspec.json.decode(data, type=End)))
            elif kind == b"error":
                out.failed.append(RunFailure.of(index, data))
    out.cancelled = [(r.index, r.ticket.request_id) for r in merged.cancelled]
    out.failed = sorted([*out.failed, *merged.expired_failures()], key=lambda f: f.run)
    return out


# --- escalation


class LevelRun(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One level's part in a group ask: ``completed`` (it answered), or ``failed`` with why."""

    level: str
    pool: str
    status: Literal["completed", "failed"]
    request_id: str = ""
    error_code: str = ""
    error: str = ""


def group_levels(client: AgentPoolClient, group: str, level: str, escalate: bool) -> list[tuple[str, str]]:
    """(level, pool) to try: ``level``, then (escalating) every higher level that has a pool."""
    g = client.config.groups.get(group)
    if g is None:
        raise NotFound(f"no group named {group!r}", error_code="GROUP_NOT_FOUND", details={"group": group})
    if level not in g.levels:
        raise NotFound(
            f"group {group!r} has no level {level!r} (levels: {', '.join(g.levels)})",
            error_code="LEVEL_NOT_FOUND",
            details={"group": group, "level": level, "levels": g.levels},
        )
    if client.config.level_pool(group, level) is None:
        raise NotFound(
            f"no pool is level {level!r} of group {group!r}",
            error_code="LEVEL_NOT_FOUND",
            details={"group": group, "level": level},
        )
    chain = g.levels[g.levels.index(level) :] if escalate else [level]
    return [(lv, p) for lv in chain if (p := client.config.level_pool(group, lv)) is not None]


def escalate_entry(run: LevelRun, to: str) -> Entry:
    """The synthetic ``escalate`` event a stream shows between levels: drop what the failed level
    showed; the next level's events follow."""
    data = EVENT_ENCODER.encode({"from": run.level, "to": to, **msgspec.to_builtins(run)})
    return (b"", b"escalate", data)


class Escalation:
    """A group ask's events level by level: ``(level, entry)``; an ``escalate`` entry between a
    failed level and the next. ``levels`` lists what ran; ``start()`` publishes the first level
    (so its 503 or 400 is the HTTP answer's status, before any event)."""

    def __init__(
        self,
        client: AgentPoolClient,
        chain: list[tuple[str, str]],
        content: str,
        keepalive_s: float | None = None,
        **kwargs: object,
    ) -> None:
        from agentpool.broker.client import new_id

        self.client = client
        self.keepalive_s = keepalive_s
        self.chain = chain
        self.content = content
        self.kwargs = kwargs
        self.thread_id = str(kwargs.pop("thread_id", None) or new_id())
        self.levels: list[LevelRun] = []
        self.current: Ticket | None = None  # the level's request running now
        self._first: tuple[Subscription, Ticket] | None = None

    async def start(self) -> Ticket:
        while True:
            level, pool = self.chain[len(self.levels)]
            try:
                self._first = await self._submit(pool)
                return self._first[1]
            except Unavailable as e:
                self._failed(level, pool, "", e.error_code, e.message)
                if len(self.levels) == len(self.chain):
                    raise

    async def _submit(self, pool: str) -> tuple[Subscription, Ticket]:
        return await self.client.submit_subscribed(
            pool, self.content, thread_id=self.thread_id, **self.kwargs
        )

    def _failed(self, level: str, pool: str, rid: str, code: str, why: str) -> None:
        self.levels.append(
            LevelRun(level=level, pool=pool, status="failed", request_id=rid, error_code=code, error=why)
        )

    def __aiter__(self) -> AsyncGenerator[tuple[str, Entry], None]:
        return self.entries()

    async def entries(self) -> AsyncGenerator[tuple[str, Entry], None]:
        """Close it when done (``contextlib.aclosing``)."""
        assert self._first is not None, "start() first"
        sub, ticket = self._first
        while True:
            level, pool = self.chain[len(self.levels)]
            final: Entry | None = None
            async for entry in self.client.stream_raw(ticket, sub=sub, keepalive_s=self.keepalive_s):
                if entry[1] == b"error":
                    final = entry
                    break
                if entry[1] in FINAL_TYPES:  # end (or interrupt): this level answered
                    done = LevelRun(level=level, pool=pool, status="completed", request_id=ticket.request_id)
                    self.levels.append(done)
                yield level, entry
            if final is None:
                return
            err = msgspec.json.decode(final[2], type=Error)
            self._failed(level, pool, ticket.request_id, err.error_code, err.error)
            while len(self.levels) < len(self.chain):
                nxt_level, nxt_pool = self.chain[len(self.levels)]
                yield level, escalate_entry(self.levels[-1], nxt_level)
                try:
                    sub, ticket = await self._submit(nxt_pool)
                    break
                except Unavailable as e:
                    level = nxt_level
                    self._failed(nxt_level, nxt_pool, "", e.error_code, e.message)
            else:
                yield (
                    level,
                    final
                    if self.levels[-1].request_id == ticket.request_id
                    else _error_entry(self.levels[-1]),
                )
                return


def _error_entry(run: LevelRun) -> Entry:
    err = Error(request_id=run.request_id, error_code=run.error_code, error=run.error)
    return (b"", b"error", EVENT_ENCODER.encode(err))


async def ask_group(
    client: AgentPoolClient, group: str, content: str, *, level: str, escalate: bool = False, **kwargs: object
) -> tuple[End, list[LevelRun]]:
    """Ask ``group`` at ``level`` (escalating on failure): the answer, and every level that ran.
    Raises :class:`RequestFailed` (``details.levels``) when no level answered."""
    chain = group_levels(client, group, level, escalate)
    esc = Escalation(client, chain, content, **kwargs)  # type: ignore[arg-type]
    await esc.start()
    async with contextlib.aclosing(esc.entries()) as entries:
        async for _level, (_id, kind, data) in entries:
            if kind == b"end":
                return msgspec.json.decode(data, type=End), esc.levels
            if kind == b"interrupt":
                raise Interrupted(msgspec.json.decode(data, type=Interrupt))
            if kind == b"error":
                err = msgspec.json.decode(data, type=Error)
                levels = [msgspec.to_builtins(lv) for lv in esc.levels]
                raise RequestFailed(
                    err.error,
                    error_code=err.error_code,
                    details={"request_id": err.request_id, "levels": levels},
                )
    raise RequestFailed("the group ask ended without an answer", error_code="INTERNAL")
