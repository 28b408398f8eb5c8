"""Running one request on a warm replica: begin, run the agent, stream, finish, ack.

The ack comes only after the final event (and the thread's messages) are written; a crash before
that redelivers the request, and ``ReplyStore.begin``/``finish`` make the retry safe. A run that
pauses for approval ends with an ``interrupt`` event; its state goes to Redis in the same write,
so any replica can continue it, after any restart, when a ``resume`` request comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import msgspec

from agentpool.broker.streams import (
    BEGIN_CANCELLED,
    BEGIN_DONE,
    BEGIN_EXHAUSTED,
    BEGIN_WAITING,
    Paused,
    ReplyStore,
)
from agentpool.shared.errors import ProviderError
from agentpool.shared.messages import (
    MESSAGE_DECODER,
    MESSAGE_ENCODER,
    Chat,
    Chunk,
    End,
    Error,
    Interrupt,
    Message,
    Request,
    StepEvent,
    Timings,
    ToolCall,
    Usage,
)
from agentpool.workers import coldstart, validation
from agentpool.workers.agents.api import Turn
from agentpool.workers.agents.loop import AgentFailed, ClientToolCalls, Decision, LoopState, NeedsApproval
from agentpool.workers.chunks import ChunkWriter
from agentpool.workers.providers.base import Sampling
from agentpool.workers.transcript import Transcript, clean_history, split_new

if TYPE_CHECKING:
    from agentpool.workers.runtime import Worker

log = logging.getLogger("agentpool.worker")


@dataclass
class Outcome:
    kind: str  # end | error | interrupt | duplicate | skipped | parked
    error_code: str = ""
    latency_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    final: Error | None = None  # for "parked": written by the runtime once the message is parked


class PausedRun(msgspec.Struct, kw_only=True):
    """A run waiting for approval, as stored in ``run:{request_id}``: enough to go on without
    repeating a model call. ``request`` is the request that started the run."""

    v: int = 1
    request: Request
    loop: LoopState
    transcript: list[Message]  # this run's messages for the thread, so far
    usage: Usage
    steps: list[StepEvent]
    content: str  # text sent so far
    system: str  # the system prompt the run started with (a renderer may vary it per run)
    first_request_id: str  # the request that started the run (its id marks the thread's messages)


PAUSED_ENCODER = msgspec.msgpack.Encoder()
PAUSED_DECODER = msgspec.msgpack.Decoder(PausedRun)


class RunSink:
    """The run's output: to the client (the chunk writer), the thread (a transcript), the steps.

    Text goes straight to the writer (it is the per-token path); the transcript gets the text
    written since the last step whenever a step comes, and at the end."""

    def __init__(self, writer: ChunkWriter, transcript: Transcript, steps: list[StepEvent]) -> None:
        self.writer = writer
        self.transcript = transcript
        self.steps = steps
        self.text = writer.emit
        self._mark = 0  # writer.parts up to here are in the transcript

    def event(self, event: StepEvent) -> None:
        self.writer.event(event)
        self.flush_text()
        self.transcript.event(event)
        self.steps.append(event)

    def flush_text(self) -> None:
        parts = self.writer.parts
        if len(parts) > self._mark:
            self.transcript.text("".join(parts[self._mark :]))
            self._mark = len(parts)


@dataclass
class Run:
    """One request's run on this replica, fresh or resumed."""

    req: Request  # the request being answered now
    attempt: int
    turn: Turn
    sink: RunSink
    writer: ChunkWriter
    started: float  # monotonic
    queue_wait_ms: float
    paused: PausedRun | None = None  # the state a resume continues from


async def _finish(store: ReplyStore, req: Request, event: End | Error | Interrupt, **kw: Any) -> bool:
    """The final write, keeping the result as long as the request asks (an Idempotency-Key's 24 h),
    whichever gateway accepted it and whether or not that one is still up."""
    return await store.finish(event, keep_s=req.keep_s, **kw)


async def run_job(worker: Worker, req: Request, received_at: float, redelivered: bool = False) -> Outcome:
    """Everything between decoding a request and acking it."""
    store, names = worker.store, worker.names
    if req.start_by is not None and received_at > req.start_by:
        await _finish(store, req, _error(req, "QUEUE_TIMEOUT", "no agent started the request in time"))
        return Outcome("skipped", "QUEUE_TIMEOUT")
    queue_wait_ms = max(0.0, (received_at - req.created_at) * 1000)
    thread_key = names.thread(req.tenant, req.thread_id)
    status, attempt, raw_history = await store.begin(
        req.request_id,
        agent_id=worker.replica_id,
        queue_wait_ms=queue_wait_ms,
        thread_key=thread_key,
        history_entries=0 if req.resume or _stateless(req) else worker.agent_type.history_turns * 2,
        max_attempts=worker.pool.limits.max_attempts,
        redelivered=redelivered,
        traceparent=req.traceparent,
        waiting_key=names.waiting(req.tenant, req.thread_id),
        resumes=_resumed_from(req),
    )
    if status == BEGIN_DONE:
        return Outcome("duplicate")
    if status == BEGIN_CANCELLED:
        await _finish(store, req, _error(req, "CANCELLED", "the client cancelled the request"))
        return Outcome("skipped", "CANCELLED")
    if status == BEGIN_WAITING:
        waiting_on = raw_history[0].decode() if raw_history else "?"
        why = (
            f"thread {req.thread_id!r} waits for approval of request {waiting_on}; resume or deny that first"
        )
        await _finish(store, req, _error(req, "THREAD_WAITING", why))
        return Outcome("error", "THREAD_WAITING")
    if status == BEGIN_EXHAUSTED:
        # The runtime parks the message first and then writes this error, so a client that sees
        # REQUEST_POISONED can find the message in the parking queue; a crash in between only
        # parks it twice, never loses it or the client's final event.
        why = f"the request failed {attempt - 1} attempts; parked"
        return Outcome("parked", "REQUEST_POISONED", final=_error(req, "REQUEST_POISONED", why, attempt))
    if attempt > 1:
        worker.metrics.redelivered()
    paused = None
    if req.resume is not None:
        paused = await _load_paused(worker, req)
        if paused is None:
            why = f"request {req.resume.request_id} is not waiting for approval (finished, or expired)"
            await _finish(store, req, _error(req, "NOT_WAITING", why, attempt))
            return Outcome("error", "NOT_WAITING")
    stored = [MESSAGE_DECODER.decode(m) for m in raw_history]
    try:
        run = _prepare(worker, req, attempt, stored, queue_wait_ms, paused)
    except AgentFailed as e:  # the request's own tools clash with the agent type's
        await _finish(store, req, _error(req, e.error_code, e.message, attempt))
        return Outcome("error", e.error_code)
    return await _execute(worker, run)


async def _load_paused(worker: Worker, req: Request) -> PausedRun | None:
    assert req.resume is not None
    blob = await worker.store.paused_state(req.resume.request_id)
    if blob is None:
        return None
    try:
        return PAUSED_DECODER.decode(blob)
    except msgspec.MsgspecError as e:
        log.error("request %s: unreadable paused state: %s", req.resume.request_id, e)
        return None


def _prepare(
    worker: Worker,
    req: Request,
    attempt: int,
    stored: list[Message],
    queue_wait_ms: float,
    paused: PausedRun | None,
) -> Run:
    """The turn the agent sees and where its output goes."""
    first = paused.request if paused else req
    chat = first.chat
    seed: list[Message] = []
    if chat is None:
        history, new = clean_history(stored), [Message("user", req.content)]
    else:
        history, new, seed = _conversation(chat, stored)
    prompt = worker.renderer(worker.agent_type, first, history)
    # The renderer's messages for one new user message; else the caller's tool results go on.
    single = chat is None or (len(new) == 1 and new[0].role == "user")
    opening = prompt.messages if single else [*history, *new]
    box = worker.toolbox.with_client(chat.tools) if chat else worker.toolbox
    turn = Turn(
        request_id=req.request_id,
        content=first.content,
        thread_id=req.thread_id,
        tenant=req.tenant,
        history=history,
        context_variables=first.context_variables,
        deadline=time.time() + worker.agent_type.run_timeout_s,
        llm=worker.llm.for_request(_sampling(chat)),
        system=paused.system if paused else _system(prompt.system, chat),
        tools=list(worker.toolbox.tools.values()),
        attempt=attempt,
        run=first.run,
        runs=first.runs,
        seed=first.seed,
        _toolbox=box,
        _max_rounds=worker.agent_type.max_tool_rounds,
        _opening=opening,
        _tool_choice=chat.tool_choice if chat else None,
    )
    writer = ChunkWriter(worker.store, req.request_id, attempt)
    if paused is None:
        transcript = Transcript([*seed, *new])
        steps: list[StepEvent] = []
    else:
        transcript = Transcript(paused.transcript)
        steps = list(paused.steps)
    sink = RunSink(writer, transcript, steps)
    return Run(req, attempt, turn, sink, writer, time.monotonic(), queue_wait_ms, paused)


def _conversation(chat: Chat, stored: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """(history, new, seed) of an OpenAI/Anthropic-style call: the history the model sees before the
    caller's new messages, and what a thread that has no history yet starts with.

    On a thread with history, the stored history comes first (the caller's copy of it may be
    trimmed or edited; the thread is the record). If the caller's new tool results answer no call
    of the stored history (its copy went another way), the caller's own conversation is used."""
    earlier, new = split_new(chat.messages)
    if not chat.stateless and stored:
        history = _ending_with(clean_history([*stored, *new]), new)
        if history is not None:
            return history, new, []
    history = _ending_with(clean_history([*earlier, *new]), new)
    # A new thread keeps the history it was started with; a thread that has one keeps its own.
    seed = [] if chat.stateless or stored else earlier
    return (history if history is not None else clean_history(earlier)), new, seed


def _ending_with(conversation: list[Message], new: list[Message]) -> list[Message] | None:
    """The history before ``new``, if ``conversation`` ends with every one of ``new`` (kept by
    :func:`clean_history`, which drops tool results that answer no call)."""
    if not new:
        return conversation
    if len(conversation) < len(new) or any(
        a is not b for a, b in zip(conversation[-len(new) :], new, strict=True)
    ):
        return None
    return conversation[: len(conversation) - len(new)]


def _system(agent_system: str, chat: Chat | None) -> str:
    """The agent type's system prompt, then the caller's own system text (if it sent any)."""
    if chat is None or not chat.system:
        return agent_system
    return f"{agent_system}\n\n{chat.system}" if agent_system else chat.system


def _sampling(chat: Chat | None) -> Sampling | None:
    if chat is None or (chat.temperature is None and chat.top_p is None and chat.max_tokens is None):
        return None
    return Sampling(temperature=chat.temperature, top_p=chat.top_p, max_tokens=chat.max_tokens)


def _stateless(req: Request) -> bool:
    return req.chat is not None and req.chat.stateless


async def _execute(worker: Worker, run: Run) -> Outcome:
    req, writer = run.req, run.writer
    task: asyncio.Task[None] = asyncio.create_task(_agent(worker, run))

    def cancel() -> None:
        if not task.done():
            task.cancel(msg="client cancelled")

    writer.on_cancel = cancel
    worker.watch_cancel(req.request_id, cancel)
    try:
        await task
    except asyncio.CancelledError:
        writer.abort()
        if task.cancelled() and not _current_task_cancelling():
            cancelled = _error(req, "CANCELLED", "the client cancelled the request", run.attempt)
            await _finish(worker.store, req, cancelled)
            return Outcome("error", "CANCELLED")
        raise
    except NeedsApproval as e:
        return await _pause(worker, run, e.state)
    except ClientToolCalls as e:  # the caller runs them; its next request brings the results
        return await _end(worker, run, e.calls)
    except TimeoutError:
        why = f"the run took longer than run_timeout_s ({worker.agent_type.run_timeout_s:g} s)"
        return await _fail(worker, run, "RUN_TIMEOUT", why)
    except ProviderError as e:
        if e.fatal:
            worker.mark_unhealthy(e.message)
        return await _fail(worker, run, e.error_code, e.message, e.retryable)
    except AgentFailed as e:
        return await _fail(worker, run, e.error_code, e.message)
    except Exception as e:  # a bug must not leave a client hanging
        log.exception("request %s failed", req.request_id, extra=log_fields(worker, req))
        writer.abort()
        failed = _error(req, "INTERNAL", f"agent failed: {type(e).__name__}", run.attempt)
        await _finish(worker.store, req, failed)
        return Outcome("error", "INTERNAL")
    finally:
        worker.unwatch_cancel(req.request_id)
    return await _end(worker, run, [])


async def _agent(worker: Worker, run: Run) -> None:
    assert worker.agent is not None  # a replica consumes only once its agent is built
    runner = worker.agent.runner
    async with asyncio.timeout(run.turn.remaining_s()):  # the deadline the agent sees in its turn
        if run.paused is None:
            await runner.run(run.turn, run.sink)
        else:
            assert run.req.resume is not None
            decision = Decision(approve=run.req.resume.approve, reason=run.req.resume.reason)
            await runner.resume(run.turn, run.sink, run.paused.loop, decision)


async def _fail(worker: Worker, run: Run, code: str, why: str, retryable: bool = False) -> Outcome:
    """Steps and text sent so far stay on the stream; the error event ends it."""
    await run.writer.close()
    req = run.req
    failed = _error(req, code, why, run.attempt, retryable)
    await _finish(worker.store, req, failed, **_resume_ends(worker, req))
    return Outcome("error", code)


def _usage(run: Run) -> Usage:
    now = run.turn.llm.usage
    before = run.paused.usage if run.paused else Usage()
    return Usage(before.input_tokens + now.input_tokens, before.output_tokens + now.output_tokens)


def _content(run: Run) -> str:
    return (run.paused.content if run.paused else "") + run.writer.text()


async def _pause(worker: Worker, run: Run, state: LoopState) -> Outcome:
    req, names = run.req, worker.names
    tail = await run.writer.close_tail()
    run.sink.flush_text()
    first_id = run.paused.first_request_id if run.paused else req.request_id
    paused = PausedRun(
        request=run.paused.request if run.paused else req,
        loop=state,
        transcript=run.sink.transcript.messages,
        usage=_usage(run),
        steps=run.sink.steps,
        content=_content(run),
        system=run.turn.system,
        first_request_id=first_id,
    )
    event = Interrupt(
        request_id=req.request_id,
        thread_id=req.thread_id,
        agent_id=worker.replica_id,
        tool_call=state.pending[0],
        deployment=worker.deployment.name,
        content=paused.content,
        usage=paused.usage,
        steps=paused.steps,
        created_at=req.created_at,
        attempt=run.attempt,
        resumed_from=_resumed_from(req) or None,
    )
    won = await _finish(
        worker.store,
        req,
        event,
        last_chunk=Chunk(text=tail, attempt=run.attempt) if tail else None,
        chunks=run.writer.chunks,
        paused=Paused(PAUSED_ENCODER.encode(paused), req.pool, req.tenant, req.thread_id),
        waiting_key=names.waiting(req.tenant, req.thread_id),
        resumed_from=_resumed_from(req),
    )
    return Outcome("interrupt" if won else "duplicate", latency_ms=_total_ms(req))


async def _end(worker: Worker, run: Run, client_calls: list[ToolCall]) -> Outcome:
    req, writer = run.req, run.writer
    if worker.validator is not None and not client_calls:
        why = await validation.rejection(worker.validator, _content(run), req)
        if why is not None:
            return await _fail(worker, run, "ANSWER_REJECTED", why)
    tail = await writer.close_tail()
    now = time.monotonic()
    first = writer.first_at or now
    cold_ms = coldstart.cold_start_ms(req, worker.info)
    usage = _usage(run)
    end = End(
        request_id=req.request_id,
        thread_id=req.thread_id,
        agent_id=worker.replica_id,
        deployment=worker.deployment.name,
        content=_content(run),
        usage=usage,
        timings=Timings(
            queue_wait_ms=round(run.queue_wait_ms, 3),
            ttft_ms=round((first - run.started) * 1000, 3),
            generation_ms=round((now - run.started) * 1000, 3),
            total_ms=round(_total_ms(req), 3),
            cold_start_ms=cold_ms,
        ),
        created_at=req.created_at,
        attempt=run.attempt,
        steps=run.sink.steps,
        resumed_from=_resumed_from(req) or None,
        stop_reason="tool_calls" if client_calls else _stop_reason(run.turn.llm.stop_reason),
        tool_calls=[ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in client_calls],
    )
    marked = run.paused.first_request_id if run.paused else req.request_id
    run.sink.flush_text()
    closed = run.sink.transcript.close(marked, awaiting_calls=bool(client_calls))
    # a stateless call stores nothing; nor does a fan-out's run (none of its N answers is the turn)
    began = run.paused.request if run.paused else req
    stateless = _stateless(began) or began.runs > 1
    won = await _finish(
        worker.store,
        req,
        end,
        thread_key="" if stateless else worker.names.thread(req.tenant, req.thread_id),
        turns=[] if stateless else [MESSAGE_ENCODER.encode(m) for m in closed],
        last_chunk=Chunk(text=tail, attempt=run.attempt) if tail else None,
        chunks=writer.chunks,
        **_resume_ends(worker, req),
    )
    if won and cold_ms:
        await coldstart.record(worker, req.pool, cold_ms)
    extra: dict[str, object] = {"usage": usage, "timings": end.timings}  # for the metrics hook
    return Outcome("end" if won else "duplicate", latency_ms=end.timings.total_ms, extra=extra)


def _stop_reason(reason: str) -> Literal["end", "max_tokens"]:
    return "max_tokens" if reason == "max_tokens" else "end"


def _resumed_from(req: Request) -> str:
    """The paused request ``req`` continues, or ""."""
    return req.resume.request_id if req.resume else ""


class _Ends(TypedDict, total=False):
    waiting_key: str
    resumed_from: str


def _resume_ends(worker: Worker, req: Request) -> _Ends:
    """For ``finish`` of a run that ends: a continuation drops its paused state and the thread's mark."""
    if req.resume is None:
        return {}
    return {
        "waiting_key": worker.names.waiting(req.tenant, req.thread_id),
        "resumed_from": req.resume.request_id,
    }


def _total_ms(req: Request) -> float:
    return max(0.0, (time.time() - req.created_at) * 1000)


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
