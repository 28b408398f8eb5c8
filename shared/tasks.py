"""Stopping background tasks so that shutdown always finishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("agentpool.tasks")

RECANCEL_S = 0.2


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel each task and wait until it is done, cancelling again every ``RECANCEL_S``.

    One cancel is not always enough: redis-py can swallow a cancel that lands mid-command, and
    on Python 3.11 ``asyncio.wait_for`` can turn one into ``TimeoutError``; the task then goes on
    and a plain ``await task`` never returns. A task that failed is logged, not raised: shutdown
    goes on with the rest.
    """
    pending = [t for t in tasks if t is not None]
    for t in pending:
        t.cancel()
    for t in pending:
        while not t.done():
            await asyncio.wait([t], timeout=RECANCEL_S)
            if not t.done():
                t.cancel()
        if not t.cancelled() and t.exception() is not None:
            log.warning("task %s failed: %r", t.get_name(), t.exception())
