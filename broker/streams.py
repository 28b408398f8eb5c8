"""Reply streams in Redis: the worker's write side and the multiplexed read side.

Write side (:class:`ReplyStore`): two Lua scripts make a request's life atomic where it matters.
``begin`` refuses a finished or cancelled request, counts the attempt, writes ``restart`` (for
attempt > 1, or a redelivery whose count was lost with a Redis restart) and ``start``, and
returns the thread history, all in one round trip. ``finish``
writes the one final event (``end`` or ``error``), preceded by the reply's last ``chunk`` when
the writer still held one, and appends the thread's turns, only if no final event was written
before (``SET done NX``): a redelivered or duplicated request can never produce two ``end``
events or two thread turns. Both entries land in one reply to a blocked ``XREAD``.

Read side (:class:`ReplyReader`): one task per process runs one ``XREAD BLOCK`` over every active
reply stream and fans entries out to per-request queues. A new subscription wakes the blocked
read with ``CLIENT UNBLOCK`` so it is included at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aredis

from agentpool.broker.redis_conn import REDIS_ERRORS, connect, translated
from agentpool.shared import metrics
from agentpool.shared.messages import (
    EVENT_ENCODER,
    FINAL_TYPES,
    Chunk,
    End,
    Error,
    Event,
    Interrupt,
    Restart,
    event_fields,
)
from agentpool.shared.names import Names
from agentpool.shared.tasks import cancel_and_wait

log = logging.getLogger("agentpool.streams")

REPLY_TTL_S = 24 * 3600  # while a request is open
REPLY_TTL_AFTER_END_S = 3600  # results stay readable (GET /v1/requests/{id}, SSE resume)
DONE_TTL_S = 24 * 3600
THREAD_TTL_S = 7 * 24 * 3600
THREAD_MAX_ENTRIES = 1000
BLOCK_MS = 2000
# Entry field of every entry an attempt's worker writes after its ``start``: how many chunks the
# attempt has written up to and including this entry. A reader that finds it off by more than its
# own entry knows text went missing between the worker and itself (a Redis that lost its newest
# writes), and repairs the stream instead of showing text that the final answer contradicts.
CHUNK_COUNT = b"n"

_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
local waiting = redis.call('GET', KEYS[6])
if waiting and waiting ~= ARGV[9] then return {-3, waiting} end
local n = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 86400)
if n > tonumber(ARGV[6]) then return {-2, n} end
if n > 1 or ARGV[7] == '1' then
  redis.call('XADD', KEYS[4], '*', 't', 'restart',
    'd', cjson.encode({type='restart', attempt=n, agent_id=ARGV[2]}))
end
redis.call('XADD', KEYS[4], '*', 't', 'start', 'd', cjson.encode({type='start',
  request_id=ARGV[1], agent_id=ARGV[2], attempt=n, queue_wait_ms=tonumber(ARGV[3]),
  traceparent=ARGV[8] ~= '' and ARGV[8] or nil}))
redis.call('EXPIRE', KEYS[4], ARGV[5])
local hist = {}
local h = tonumber(ARGV[4])
if h > 0 then hist = redis.call('LRANGE', KEYS[5], -h, -1) end
return {n, hist}
"""

# KEYS: done, reply, thread; with run options also: run (the paused state to write), waiting (the
# thread's mark), old run (a paused state to drop). ARGV: 1 kind, 2 event, 3 done ttl, 4 reply ttl,
# 5 thread ttl, 6 thread max, 7 last chunk or '', 8 run options or '' (JSON: pool, tenant,
# thread id, paused ttl, the waiting mark to clear or ''), 9 the paused state or '', 10 the
# attempt's chunk count after the last chunk (field n, see CHUNK_COUNT) or '', 11.. turns.
_FINISH = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then return 0 end
if ARGV[7] ~= '' then redis.call('XADD', KEYS[2], '*', 't', 'chunk', 'd', ARGV[7], 'n', ARGV[10]) end
if ARGV[10] ~= '' then
  redis.call('XADD', KEYS[2], '*', 't', ARGV[1], 'd', ARGV[2], 'n', ARGV[10])
else
  redis.call('XADD', KEYS[2], '*', 't', ARGV[1], 'd', ARGV[2])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
if #ARGV > 10 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 11))
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
if ARGV[8] == '' then return 1 end
local o = cjson.decode(ARGV[8])
if KEYS[6] ~= KEYS[1] then redis.call('DEL', KEYS[6]) end
if o[5] ~= '' and redis.call('GET', KEYS[5]) == o[5] then redis.call('DEL', KEYS[5]) end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[4], 'state', ARGV[9], 'pool', o[1], 'tenant', o[2], 'thread_id', o[3])
  redis.call('EXPIRE', KEYS[4], o[4])
  redis.call('SET', KEYS[5], cjson.decode(ARGV[2]).request_id, 'EX', o[4])
end
return 1
"""

# A continuation that never started (a gateway wrote its QUEUE_TIMEOUT) leaves the paused state in
# place: then the claim may be taken again. ARGV: 1 new request id, 2 ttl, 3 the done-key prefix,
# 4 the caller's tenant ('' = any): another tenant's paused run looks like none.
_RESUME = """
local run = redis.call('HMGET', KEYS[1], 'pool', 'tenant', 'thread_id')
local claimed = redis.call('GET', KEYS[2])
if run[1] and ARGV[4] ~= '' and run[2] ~= ARGV[4] then return {-1} end
if not run[1] then
  if claimed then return {-2, claimed} end
  return {-1}
end
if claimed and redis.call('EXISTS', ARGV[3] .. claimed) == 0 then return {0, claimed} end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return {1, run[1], run[2], run[3]}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_OPTIONS = msgspec.json.Encoder()

BEGIN_DONE = 0
BEGIN_CANCELLED = -1
BEGIN_EXHAUSTED = -2
BEGIN_WAITING = -3
PAUSED_TTL_S = 7 * 24 * 3600  # a run waiting for approval keeps this long


@dataclass(slots=True)
class Paused:
    """What ``finish`` stores for a run that waits for approval (``run:{request_id}``)."""

    state: bytes  # the worker's own state blob
    pool: str
    tenant: str
    thread_id: str


class ReplyStore:
    """Worker-side (and gateway-side, for errors it decides) writes to reply streams."""

    def __init__(self, redis: aredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        self._begin = redis.register_script(_BEGIN)
        self._finish = redis.register_script(_FINISH)
        self._resume = redis.register_script(_RESUME)
        self._release = redis.register_script(_RELEASE)

    async def begin(
        self,
        request_id: str,
        *,
        agent_id: str,
        queue_wait_ms: float,
        thread_key: str,
        history_entries: int,
        max_attempts: int,
        redelivered: bool = False,
        traceparent: str | None = None,
        waiting_key: str = "",
        resumes: str = "",
    ) -> tuple[int, int, list[bytes]]:
        """-> (status, attempt, history). status > 0 is the attempt number; else a BEGIN_* code
        (for BEGIN_WAITING, history is ``[the paused request id]``: the thread waits on it, and
        only the request that ``resumes`` it may run)."""
        n = self.names
        res = await self._begin(
            keys=[
                n.done(request_id),
                n.cancel(request_id),
                n.attempts(request_id),
                n.reply(request_id),
                thread_key,
                waiting_key or n.done(request_id),
            ],
            args=[
                request_id,
                agent_id,
                round(queue_wait_ms, 3),
                history_entries,
                REPLY_TTL_S,
                max_attempts,
                "1" if redelivered else "0",
                traceparent or "",
                resumes,
            ],
        )
        status = int(res[0])
        if status == BEGIN_EXHAUSTED:
            return status, int(res[1]), []
        if status == BEGIN_WAITING:
            return status, 0, [res[1]]
        if status <= 0:
            return status, 0, []
        return status, status, list(res[1])

    async def append(self, request_id: str, events: Sequence[Event], chunks: int = 0) -> bool:
        """Append events in order, in one round trip; returns True if the request was cancelled.

        ``chunks``: how many chunks this attempt wrote before; each entry carries the count after
        it (:data:`CHUNK_COUNT`), so a reader sees when one went missing."""
        n = self.names
        key = n.reply(request_id)
        async with self.redis.pipeline(transaction=False) as p:
            for event in events:
                chunks += type(event) is Chunk
                fields: dict[Any, Any] = event_fields(event)  # stubs differ per major
                fields[CHUNK_COUNT] = b"%d" % chunks
                p.xadd(key, fields)
            p.exists(n.cancel(request_id))
            res = await p.execute()
        return bool(res[-1])

    async def finish(
        self,
        event: End | Error | Interrupt,
        *,
        thread_key: str = "",
        turns: Sequence[bytes] = (),
        last_chunk: Chunk | None = None,
        paused: Paused | None = None,
        waiting_key: str = "",
        resumed_from: str = "",
        chunks: int | None = None,
        keep_s: int = 0,
    ) -> bool:
        """Write the final event (after ``last_chunk``, and with the thread turns) unless one was
        written already. ``chunks``: how many chunks the attempt wrote before ``last_chunk`` (None
        for a final event not written by the attempt's worker, which carries no count).
        ``paused`` (with an Interrupt) stores the run and marks the thread ``waiting_key``; a run
        that ``resumed_from`` a paused one drops that one's state and, when it ends, the thread's
        mark. ``keep_s``: keep the reply stream that long after the end, if more than the usual hour."""
        n = self.names
        kind = str(type(event).__struct_config__.tag)
        done = n.done(event.request_id)
        keys = [done, n.reply(event.request_id), thread_key or done]
        options = state = b""
        if paused is not None or resumed_from:
            keys += [
                n.run(event.request_id),
                waiting_key or done,
                n.run(resumed_from) if resumed_from else done,
            ]
            clear = resumed_from if waiting_key and paused is None else ""
            where = [paused.pool, paused.tenant, paused.thread_id] if paused else ["", "", ""]
            options = _OPTIONS.encode([*where, PAUSED_TTL_S, clear])
            state = paused.state if paused else b""
        res = await self._finish(
            keys=keys,
            args=[
                kind,
                EVENT_ENCODER.encode(event),
                DONE_TTL_S,
                max(REPLY_TTL_AFTER_END_S, keep_s),
                THREAD_TTL_S,
                THREAD_MAX_ENTRIES,
                EVENT_ENCODER.encode(last_chunk) if last_chunk is not None else b"",
                options,
                state,
                "" if chunks is None else chunks + (last_chunk is not None),
                *turns,
            ],
        )
        return bool(res)

    async def paused_state(self, request_id: str) -> bytes | None:
        """The worker's state blob of a paused run, if it is still waiting."""
        blob: Any = await self.redis.hget(self.names.run(request_id), "state")
        return bytes(blob) if blob is not None else None

    async def claim_resume(
        self, request_id: str, new_request_id: str, tenant: str = ""
    ) -> tuple[int, list[str]]:
        """Claim the continuation of a paused run: (1, [pool, tenant, thread_id]) for the first
        caller; (0, [the continuation]) if another caller claimed it; (-2, [continuation]) if the
        continuation ran already; (-1, []) if ``request_id`` is not paused (never, or expired)."""
        n = self.names
        res = await self._resume(
            keys=[n.run(request_id), n.resumed(request_id)],
            args=[new_request_id, PAUSED_TTL_S, n.done(""), tenant],
        )
        return int(res[0]), [v.decode() if isinstance(v, bytes) else str(v) for v in res[1:]]

    async def release_resume(self, request_id: str, new_request_id: str) -> None:
        """Give a claim back when its continuation could not be published."""
        await self._release(keys=[self.names.resumed(request_id)], args=[new_request_id])

    async def is_cancelled(self, request_id: str) -> bool:
        return bool(await self.redis.exists(self.names.cancel(request_id)))

    async def cancel(self, request_id: str, ttl_s: int = 3600) -> None:
        await self.redis.set(self.names.cancel(request_id), b"1", ex=ttl_s)


def entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


_STREAM_ID = re.compile(rb"^([0-9]{1,20})-([0-9]{1,20})$")
_U64_MAX = 2**64 - 1


def is_stream_id(entry_id: bytes) -> bool:
    """A full Redis stream entry id ``ms-seq``, each part within 64 bits (what XREAD accepts)."""
    m = _STREAM_ID.match(entry_id)
    return m is not None and int(m[1]) <= _U64_MAX and int(m[2]) <= _U64_MAX


Entry = tuple[bytes, bytes, bytes]  # (entry id, type, data json)


ATTEMPT_STARTS = (b"start", b"restart")  # an attempt begins: no chunk of it written yet
_GAP_FINALS = {b"end": End, b"interrupt": Interrupt}  # final events that carry the attempt's text


class Subscription:
    """The entries of one reply stream after ``last_id``, ending after the final event.

    It checks each entry's chunk count (:data:`CHUNK_COUNT`). Once one is off (an entry went
    missing: a Redis that lost its newest writes, or a restart event lost with them), it drops
    the attempt's remaining chunks and, before the final event, puts a ``restart`` (reason
    ``gap``) and one chunk holding the whole text: what a reader shows after its last restart
    always adds up to the final event's content. ``chunks`` is the count as of ``last_id`` when
    the caller knows it (None: take the first count seen as it).
    """

    def __init__(self, reader: ReplyReader, key: bytes, last_id: bytes, chunks: int | None = None) -> None:
        self._reader = reader
        self.key = key
        self.last_id = last_id
        self.queue: asyncio.Queue[Entry] = asyncio.Queue()
        self.finished = False
        self.chunks = 0 if last_id == b"0-0" else chunks
        self.gap = False

    def offer(self, entry_id: bytes, kind: bytes, fields: dict[bytes, bytes]) -> None:
        """Queue one entry read from the stream (the reader's hot path: a lookup and a compare)."""
        anchor, self.last_id = self.last_id, entry_id
        count = fields.get(CHUNK_COUNT)
        if count is not None:
            n = int(count)
            if self.chunks is not None and n != self.chunks + (kind == b"chunk"):
                self.gap = True
            self.chunks = n
            if self.gap:
                if kind == b"chunk":
                    return
                if kind in _GAP_FINALS:
                    self._repair(anchor, kind, fields[b"d"])
        elif kind in ATTEMPT_STARTS:
            self.chunks, self.gap = 0, False
        self.queue.put_nowait((entry_id, kind, fields[b"d"]))

    def _repair(self, anchor: bytes, kind: bytes, data: bytes) -> None:
        """Before the final event: restart (gap) and the whole text, under the id of the entry before
        it, so a client resuming from there gets just the final event."""
        final = msgspec.json.decode(data, type=_GAP_FINALS[kind])
        restart = Restart(attempt=final.attempt, agent_id=final.agent_id, reason="gap")
        self.queue.put_nowait((anchor, b"restart", EVENT_ENCODER.encode(restart)))
        if final.content:
            chunk = Chunk(text=final.content, attempt=final.attempt)
            self.queue.put_nowait((anchor, b"chunk", EVENT_ENCODER.encode(chunk)))
        metrics.stream_gap()
        log.warning("reply stream %s lost entries; sent the whole text after a restart event", self.key)

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Entry]:
        try:
            while True:
                entry = await self.queue.get()
                yield entry
                if entry[1] in FINAL_TYPES:
                    return
        finally:
            self.close()

    async def next(self, timeout_s: float | None = None) -> Entry:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can report a cancel that races the
        # timeout as TimeoutError, and callers treat that as "send a keep-alive" and go on.
        async with asyncio.timeout(timeout_s):
            return await self.queue.get()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._reader._remove(self)


class ReplyReader:
    """One blocking ``XREAD`` per process over every open subscription."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._subs: dict[bytes, list[Subscription]] = {}
        self._conn: aredis.Redis | None = None
        self._ctl: aredis.Redis | None = None
        self._client_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._has_subs = asyncio.Event()
        self._blocking = False
        self._waking = False
        self.healthy = False
        self.lag_s = 0.0  # how old the newest entry was when read (observability)

    async def start(self) -> None:
        self._conn = connect(self.url, single_connection_client=True, socket_timeout=BLOCK_MS / 1000 + 5)
        self._ctl = connect(self.url, max_connections=4)
        with translated(self.url):
            self._client_id = await self._conn.client_id()
        self.healthy = True
        self._task = asyncio.create_task(self._run(), name="reply-reader")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])
        for c in (self._conn, self._ctl):
            if c is not None:
                await c.aclose()

    def subscribe(self, key: str, after: bytes = b"0-0", chunks: int | None = None) -> Subscription:
        """Entries after ``after``; ``chunks``: the attempt's chunk count as of ``after``, if known."""
        # One bad id would make Redis refuse the XREAD shared by every subscription.
        if not is_stream_id(after):
            raise ValueError(f"not a stream entry id: {after!r}")
        sub = Subscription(self, key.encode(), after, chunks)
        self._subs.setdefault(sub.key, []).append(sub)
        self._has_subs.set()
        self._wake()
        return sub

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._subs[sub.key]

    def _wake(self) -> None:
        """Interrupt a blocked XREAD so it picks up new streams (one unblock in flight at most)."""
        if self._blocking and not self._waking and self._ctl is not None:
            self._waking = True
            asyncio.get_running_loop().create_task(self._unblock())

    async def _unblock(self) -> None:
        try:
            if self._ctl is not None and self._client_id is not None:
                await self._ctl.client_unblock(self._client_id)
        except REDIS_ERRORS:
            pass
        finally:
            self._waking = False

    def _streams(self) -> dict[Any, Any]:  # redis-py's stubs differ per major; keys and ids are bytes
        streams: dict[Any, Any] = {}
        for key, subs in self._subs.items():
            streams[key] = min((s.last_id for s in subs), key=entry_order)
        return streams

    async def _run(self) -> None:
        assert self._conn is not None
        backoff = 0.05
        while True:
            if not self._subs:
                self._has_subs.clear()
                await self._has_subs.wait()
                continue
            try:
                self._blocking = True
                try:
                    resp = await self._conn.xread(self._streams(), block=BLOCK_MS)
                finally:
                    self._blocking = False
                self.healthy = True
                backoff = 0.05
            except REDIS_ERRORS as e:
                self.healthy = False
                log.warning("reply reader lost Redis: %s; retrying in %.2fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._reconnect()
                continue
            if resp:
                # RESP2 answers [[key, entries], ...]; RESP3 a {key: entries} map.
                self._dispatch(list(resp.items()) if isinstance(resp, dict) else resp)

    async def _reconnect(self) -> None:
        try:
            assert self._conn is not None
            self._client_id = await self._conn.client_id()
            self.healthy = True
        except REDIS_ERRORS:
            pass

    def _dispatch(self, resp: list[Any]) -> None:
        now_ms = time.time() * 1000
        for key, entries in resp:
            subs = self._subs.get(key)
            if not subs or not entries:
                continue
            newest = entry_order(entries[-1][0])
            self.lag_s = max(0.0, (now_ms - newest[0]) / 1000)
            metrics.reader_lag(self.lag_s)
            for sub in list(subs):
                floor = entry_order(sub.last_id)
                for entry_id, fields in entries:
                    if entry_order(entry_id) <= floor:
                        continue
                    kind = fields[b"t"]
                    sub.offer(entry_id, kind, fields)
                    if kind in FINAL_TYPES:
                        self._remove(sub)  # nothing follows a final event: stop reading it
                        break
