"""Coalescing reply writer: text emitted while the previous XADD is in flight rides the next one.

The first piece goes out after one event-loop turn (microseconds); under a fast stream
the writer sends one entry per Redis round trip instead of one per token, which is where most
of the per-request CPU went in the floor benchmark. Step events (tool calls, tool results,
custom steps) keep their place between the text around them: consecutive text becomes one
``chunk``, and everything pending goes out in one pipelined round trip. Text still unwritten when
the run ends (:meth:`ChunkWriter.close_tail`) rides the final event's own write, so a reply whose
last tokens come together with its end costs one Redis round trip, and one XREAD wake-up, less.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agentpool.broker.streams import ReplyStore
from agentpool.shared.messages import Chunk, Event, StepEvent

Pending = str | StepEvent


class ChunkWriter:
    def __init__(
        self, store: ReplyStore, request_id: str, attempt: int, on_cancel: Callable[[], None] | None = None
    ) -> None:
        self._store = store
        self._request_id = request_id
        self._attempt = attempt
        self.on_cancel = on_cancel  # called when a write finds the request cancelled
        self._pending: list[Pending] = []
        self._events = 0  # step events among the pending items
        self.parts: list[str] = []  # every piece of text emitted, in order
        self.chunks = 0  # chunk entries written so far (each entry carries the count, see CHUNK_COUNT)
        self._wake = asyncio.Event()
        self._closing = False
        self._keep_tail = False
        self.first_at: float | None = None
        self._task = asyncio.create_task(self._run(), name=f"chunks-{request_id}")

    def text(self) -> str:
        return "".join(self.parts)

    def emit(self, text: str) -> None:
        if not text:
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
        self._pending.append(text)
        self.parts.append(text)
        self._wake.set()

    def event(self, event: StepEvent) -> None:
        """A step event, written after the text emitted before it."""
        event.attempt = self._attempt
        self._pending.append(event)
        self._events += 1
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # One loop turn before taking the text: tokens handed over in this turn ride along,
            # and a generation that ends in it (a fast model) leaves all of it to the final write.
            await asyncio.sleep(0)
            self._wake.clear()
            if self._keep_tail:
                return
            if self._pending:
                await self._write(self._take(len(self._pending)))
            if self._closing and not self._pending:
                return

    def _take(self, n: int) -> list[Event]:
        """The first ``n`` pending items as stream events, consecutive text joined into one chunk."""
        items, self._pending = self._pending[:n], self._pending[n:]
        if not self._events:  # text only: the common case, one chunk
            return [Chunk(text="".join(items), attempt=self._attempt)]  # type: ignore[arg-type]
        self._events -= sum(not isinstance(item, str) for item in items)
        out: list[Event] = []
        text: list[str] = []
        for item in items:
            if isinstance(item, str):
                text.append(item)
                continue
            if text:
                out.append(Chunk(text="".join(text), attempt=self._attempt))
                text = []
            out.append(item)
        if text:
            out.append(Chunk(text="".join(text), attempt=self._attempt))
        return out

    async def _write(self, events: list[Event]) -> None:
        before = self.chunks
        self.chunks += sum(type(e) is Chunk for e in events)
        if await self._store.append(self._request_id, events, before) and self.on_cancel is not None:
            self.on_cancel()

    async def close(self) -> None:
        """Flush what is pending and stop; re-raises a write error (e.g. Redis gone)."""
        self._closing = True
        self._wake.set()
        await self._task

    async def close_tail(self) -> str:
        """Stop once the entry in flight (if any) is written; write pending step events; return the
        trailing text not written yet, for the caller to write with the final event. Re-raises a
        write error."""
        self._closing = self._keep_tail = True
        self._wake.set()
        await self._task
        if self._events:
            last_event = max(i for i, p in enumerate(self._pending) if not isinstance(p, str))
            await self._write(self._take(last_event + 1))
        tail = "".join(self._pending)  # type: ignore[arg-type]  # text only by now
        self._pending.clear()
        return tail

    def abort(self) -> None:
        self._task.cancel()
