"""Running one request on a warm replica: begin, generate, stream, finish, ack.

The ack comes only after the final event (and the thread's turns) are written; a crash before
that redelivers the request, and ``ReplyStore.begin``/``finish`` make the retry safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.streams import BEGIN_CANCELLED, BEGIN_DONE, BEGIN_EXHAUSTED
from shared.errors import ProviderError
from shared.messages import TURN_DECODER, TURN_ENCODER, Chunk, End, Error, Request, Timings, Turn, Usage
from workers import coldstart
from workers.chunks import ChunkWriter
from workers.providers.base import Message

if TYPE_CHECKING:
    from workers.runtime import Worker

log = logging.getLogger("agentpool.worker")


class Cancelled(Exception):
    """The client went away (cancel key set): stop generating."""


@dataclass
class Outcome:
    kind: str  # end | error | duplicate | skipped | parked
    error_code: str = ""
    latency_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    final: Error | None = None  # for "parked": written by the runtime once the message is parked


async def run_job(worker: Worker, req: Request, received_at: float, redelivered: bool = False) -> Outcome:
    """Everything between decoding a request and acking it."""
    store, names = worker.store, worker.names
    if req.start_by is not None and received_at > req.start_by:
        await store.finish(_error(req, "QUEUE_TIMEOUT", "no agent started the request in time"))
        return Outcome("skipped", "QUEUE_TIMEOUT")
    queue_wait_ms = max(0.0, (received_at - req.created_at) * 1000)
    thread_key = names.thread(req.tenant, req.thread_id)
    status, attempt, raw_history = await store.begin(
        req.request_id,
        agent_id=worker.replica_id,
        queue_wait_ms=queue_wait_ms,
        thread_key=thread_key,
        history_entries=worker.agent_type.history_turns * 2,
        max_attempts=worker.pool.limits.max_attempts,
        redelivered=redelivered,
        traceparent=req.traceparent,
    )
    if status == BEGIN_DONE:
        return Outcome("duplicate")
    if status == BEGIN_CANCELLED:
        await store.finish(_error(req, "CANCELLED", "the client cancelled the request"))
        return Outcome("skipped", "CANCELLED")
    if status == BEGIN_EXHAUSTED:
        # The runtime parks the message first and then writes this error, so a client that sees
        # REQUEST_POISONED can find the message in the parking queue; a crash in between only
        # parks it twice, never loses it or the client's final event.
        why = f"the request failed {attempt - 1} attempts; parked"
        return Outcome("parked", "REQUEST_POISONED", final=_error(req, "REQUEST_POISONED", why, attempt))
    if attempt > 1:
        worker.metrics.redelivered()
    history = [Message(t.role, t.content) for t in map(TURN_DECODER.decode, raw_history)]
    return await _generate(worker, req, attempt, history, thread_key, queue_wait_ms)


async def _generate(
    worker: Worker,
    req: Request,
    attempt: int,
    history: list[Message],
    thread_key: str,
    queue_wait_ms: float,
) -> Outcome:
    t0 = time.monotonic()
    prompt = worker.renderer(worker.agent_type, req, history)
    gen: asyncio.Task[Usage] | None = None

    def cancel() -> None:
        if gen is not None and not gen.done():
            gen.cancel(msg="client cancelled")

    writer = ChunkWriter(worker.store, req.request_id, attempt, cancel)
    gen = asyncio.create_task(worker.generate(prompt, writer.emit))
    try:
        usage = await gen
    except asyncio.CancelledError:
        writer.abort()
        if gen.cancelled() and not _current_task_cancelling():
            await worker.store.finish(_error(req, "CANCELLED", "the client cancelled the request", attempt))
            return Outcome("error", "CANCELLED")
        raise
    except ProviderError as e:
        await writer.close()
        await worker.store.finish(_error(req, e.error_code, e.message, attempt, e.retryable))
        if e.fatal:
            worker.mark_unhealthy(e.message)
        return Outcome("error", e.error_code)
    except Exception as e:  # a bug must not leave a client hanging
        log.exception("request %s failed", req.request_id, extra=log_fields(worker, req))
        writer.abort()
        await worker.store.finish(_error(req, "INTERNAL", f"agent failed: {type(e).__name__}", attempt))
        return Outcome("error", "INTERNAL")
    tail = await writer.close_tail()
    content = writer.text()
    now = time.monotonic()
    first = writer.first_at or now
    total_ms = max(0.0, (time.time() - req.created_at) * 1000)
    cold_ms = coldstart.cold_start_ms(req, worker.info)
    end = End(
        request_id=req.request_id,
        thread_id=req.thread_id,
        agent_id=worker.replica_id,
        content=content,
        usage=usage,
        timings=Timings(
            queue_wait_ms=round(queue_wait_ms, 3),
            ttft_ms=round((first - t0) * 1000, 3),
            generation_ms=round((now - t0) * 1000, 3),
            total_ms=round(total_ms, 3),
            cold_start_ms=cold_ms,
        ),
        created_at=req.created_at,
        attempt=attempt,
    )
    turns = (
        TURN_ENCODER.encode(Turn("user", req.content, req.request_id)),
        TURN_ENCODER.encode(Turn("assistant", content, req.request_id)),
    )
    last_chunk = Chunk(text=tail, attempt=attempt) if tail else None
    won = await worker.store.finish(end, thread_key=thread_key, turns=turns, last_chunk=last_chunk)
    if won and cold_ms:
        await coldstart.record(worker, req.pool, cold_ms)
    extra: dict[str, object] = {"usage": usage, "timings": end.timings}  # for the metrics hook
    return Outcome("end" if won else "duplicate", latency_ms=total_ms, extra=extra)


def log_fields(worker: Worker, req: Request) -> dict[str, str]:
    """What every log line about ``req`` carries (``extra=``): ids and the trace context, never content."""
    fields = {
        "request_id": req.request_id,
        "thread_id": req.thread_id,
        "pool": req.pool,
        "replica": worker.replica_id,
    }
    if req.traceparent:
        fields["traceparent"] = req.traceparent
    return fields


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task and task.cancelling())


def _error(req: Request, code: str, why: str, attempt: int = 0, retryable: bool = False) -> Error:
    return Error(request_id=req.request_id, error_code=code, error=why, attempt=attempt, retryable=retryable)
