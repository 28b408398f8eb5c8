"""Server-Sent Events framing for reply streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from agentpool.broker import shapes
from agentpool.broker.client import KEEPALIVE, AgentPoolClient
from agentpool.shared import metrics
from agentpool.shared.messages import FINAL_TYPES

KEEPALIVE_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_background: set[asyncio.Task[Any]] = set()


def cancel_on_abandon(client: AgentPoolClient, request_id: str) -> Callable[[], None]:
    """What to run when a client leaves a stream before its end: stop the agent generating."""

    def abandon() -> None:
        task = asyncio.get_running_loop().create_task(client.store.cancel(request_id))
        _background.add(task)
        task.add_done_callback(_background.discard)

    return abandon


def cancel_soon(client: AgentPoolClient, request_ids: list[str]) -> None:
    """Stop these runs, from a task of its own (a stream's reader is going away)."""
    task = asyncio.get_running_loop().create_task(shapes.cancel_all(client, request_ids))
    _background.add(task)
    task.add_done_callback(_background.discard)


def frame(entry_id: bytes, kind: bytes, data: bytes) -> bytes:
    """``id:`` is the Redis stream entry id, so ``Last-Event-ID`` resumes on any gateway; an event
    with no entry of its own (a fan-out's or a group's) has none."""
    head = b"id: " + entry_id + b"\n" if entry_id else b""
    return head + b"event: " + kind + b"\ndata: " + data + b"\n\n"


async def frames(
    entries: AsyncIterator[tuple[bytes, bytes, bytes]], on_abandon: Callable[[], None]
) -> AsyncIterator[bytes]:
    """SSE frames for ``entries``; ``on_abandon`` runs if the client leaves before the end."""
    finished = False
    metrics.sse_streams(1)
    try:
        async for entry in entries:
            if entry is KEEPALIVE:
                yield b": keep-alive\n\n"
                continue
            yield frame(*entry)
            finished = entry[1] in FINAL_TYPES
    finally:
        metrics.sse_streams(-1)
        if not finished:
            on_abandon()
