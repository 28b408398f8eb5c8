"""The front doors existing apps speak: OpenAI Chat Completions and Anthropic Messages.

Both are thin translations onto the same path as ``/v1/ask``: the same key (``Authorization:
Bearer`` or ``x-api-key``), tenant, scopes, rate limit, idempotency and admission, the same
publish, reply stream and request id. ``model`` names the pool. Each API's module
(:mod:`agentpool.gateway.openai_compat`, :mod:`agentpool.gateway.anthropic_compat`) reads its body
into a :class:`~agentpool.shared.messages.Chat` and writes the answer (JSON, or SSE translated event
by event) and errors in its own shape; this module holds what they share.

Conversations: the caller sends the whole history every time. With ``X-Thread-ID`` (or, for
OpenAI, ``metadata.thread_id``) the pool's stored thread is used and only the new trailing
messages are appended; without one the call is stateless (nothing is stored) and routed by a hash
of its first messages, so a conversation keeps returning to the same warm agent.

A stream whose run restarts on another replica (the first one died) cannot take back text it
sent: the new attempt's text is checked against it, the part already sent is skipped, and if the
new attempt says something else the stream ends with an error instead of a contradiction.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec
import redis.exceptions
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from agentpool.broker.client import KEEPALIVE, AgentPoolClient, Ticket, check_callers_turn, check_thread_id
from agentpool.broker.redis_conn import redis_unavailable
from agentpool.gateway import admission
from agentpool.gateway.admission import Admitted, Started
from agentpool.gateway.auth import Principal, pool_for, require
from agentpool.gateway.http import decode, error_headers, read_body
from agentpool.gateway.idempotency import idempotency_key
from agentpool.gateway.schemas import AskBody
from agentpool.gateway.sse import SSE_HEADERS, cancel_on_abandon
from agentpool.shared import metrics
from agentpool.shared.config import Pool
from agentpool.shared.errors import AgentPoolError, BadRequest, Interrupted, RequestFailed, status_for_code
from agentpool.shared.messages import Chat, Chunk, End, Error, Interrupt, Message, ToolCall, Usage

T = TypeVar("T")
MAX_CHAT_BODY_BYTES = 1024 * 1024  # a whole conversation comes with every call
KEEPALIVE_S = 15.0
_CHUNK = msgspec.json.Decoder(Chunk)
_ERROR = msgspec.json.Decoder(Error)
_INTERRUPT = msgspec.json.Decoder(Interrupt)


class Shape(Protocol):
    """One API's way of writing answers and errors."""

    def error(self, err: AgentPoolError, headers: dict[str, str]) -> Response: ...


Handler = Callable[[Request], Awaitable[Response]]


def answers_errors_as(shape_for: Callable[[Request], Shape]) -> Callable[[Handler], Handler]:
    """Every error of the handler in the format of ``shape_for(request)``, with ``Retry-After``
    and the rate limit's headers."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except AgentPoolError as err:
                return _error(shape_for(request), request, err)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                lost = redis_unavailable(request.app.state.settings.redis_url, exc)
                return _error(shape_for(request), request, lost)

        return run

    return wrap


def _error(shape: Shape, request: Request, err: AgentPoolError) -> Response:
    return shape.error(err, error_headers(err, getattr(request.state, "rate_headers", None)))


def client_of(request: Request) -> AgentPoolClient:
    return request.app.state.client  # type: ignore[no-any-return]


async def caller(request: Request) -> Principal:
    return await require(request, "ask")


async def body_of(request: Request, type_: type[T], api: str) -> T:
    """The body as ``type_``; a field of the API that agentpool does not take is named as such."""
    try:
        return decode(await read_body(request, MAX_CHAT_BODY_BYTES), type_)
    except BadRequest as e:
        field = e.details.get("field", "")
        if e.message.startswith("Object contains unknown field") and "." not in field and "[" not in field:
            e.message = f"{field}: not supported by agentpool's {api} endpoint"
            e.args = (e.message,)
        raise


def thread_header(request: Request) -> str | None:
    """``X-Thread-ID``, validated like ``thread_id`` of ``/v1/ask``."""
    raw = request.headers.get("x-thread-id")
    return None if raw is None else check_thread_id(raw, "X-Thread-ID", {"header": "X-Thread-ID"})


def check_conversation(messages: list[Message], stateless: bool) -> None:
    """What every model API refuses, refused here before anything is queued: a conversation that
    does not end with the caller's turn, and (when the messages are the whole conversation)
    tool results that answer no call or calls left without results."""
    check_callers_turn(messages)
    waiting: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in waiting and stateless:
                raise BadRequest(
                    f"messages[{i}]: the tool result {m.tool_call_id!r} answers no tool call of the "
                    "assistant message before it",
                    error_code="VALIDATION_ERROR",
                    details={"field": f"messages[{i}]"},
                )
            waiting.discard(m.tool_call_id)
            continue
        if waiting:
            raise BadRequest(
                f"messages[{i}]: tool calls {sorted(waiting)} have no result right after them",
                error_code="VALIDATION_ERROR",
                details={"field": f"messages[{i}]"},
            )
        waiting = {c.id for c in m.tool_calls}


async def start(
    request: Request, principal: Principal, pool_name: str, chat: Chat, thread_id: str | None, stream: bool
) -> tuple[Started, Admitted]:
    """Admit (the caller's pool, its rate limit) and publish, as ``/v1/ask`` does."""
    client = client_of(request)
    pool: Pool = pool_for(client, principal, pool_name)
    rate_headers = await admission.rate_limit(request, principal, pool_name, pool)
    last_user = next((m.content for m in reversed(chat.messages) if m.role == "user"), "")
    body = AskBody(content=last_user, thread_id=thread_id, stream=stream)
    admitted = Admitted(principal, pool_name, pool, body, idempotency_key(request), rate_headers, chat=chat)
    return await admission.start(request, admitted), admitted


def headers_of(ticket: Ticket, admitted: Admitted, started: Started, stateless: bool) -> dict[str, str]:
    headers = {"X-Request-ID": ticket.request_id, "X-Routing-Tier": ticket.tier, **admitted.rate_headers}
    if not stateless:
        headers["X-Thread-ID"] = ticket.thread_id
    if started.replay:
        headers["Idempotent-Replayed"] = "true"
    return headers


async def final(client: AgentPoolClient, started: Started) -> End | Interrupt:
    """The run's last event: its answer, or the pause for approval; an error event raises."""
    try:
        end: End = await client.result(started.ticket, sub=started.sub)
    except RequestFailed as e:
        e.status = status_for_code(e.error_code)
        raise
    except Interrupted as paused:
        interrupt: Interrupt = paused.interrupt
        return interrupt
    return end


class EndView(msgspec.Struct, kw_only=True):
    """What a translated stream needs of the ``end`` event (decoding skips its steps and timings)."""

    request_id: str
    content: str
    usage: Usage
    stop_reason: str = "end"
    tool_calls: list[ToolCall] = []


_END = msgspec.json.Decoder(EndView)


class Writer(Protocol):
    """One API's SSE events for one reply, each as bytes ready to send."""

    def head(self) -> bytes: ...

    def text(self, text: str) -> bytes: ...

    def end(self, end: EndView) -> bytes: ...

    def interrupt(self, event: Interrupt) -> bytes: ...

    def error(self, code: str, message: str, status: int) -> bytes: ...

    def keepalive(self) -> bytes: ...


class _Replay:
    """Text already sent when the run restarted: the new attempt's text must repeat it first."""

    def __init__(self, sent: str) -> None:
        self.sent = sent
        self.pos = 0

    def take(self, text: str) -> str | None:
        """The part of ``text`` past what was sent, or None if it says something else."""
        rest = self.sent[self.pos :]
        if text.startswith(rest):  # caught up within this piece
            self.pos = len(self.sent)
            return text[len(rest) :]
        if rest.startswith(text):
            self.pos += len(text)
            return ""
        return None

    @property
    def done(self) -> bool:
        return self.pos >= len(self.sent)


async def translated(
    entries: AsyncIterator[tuple[bytes, bytes, bytes]], writer: Writer, on_abandon: Callable[[], None]
) -> AsyncIterator[bytes]:
    """The reply stream as ``writer``'s events; ``on_abandon`` runs if the client leaves first."""
    finished = False
    sent: list[str] = []
    replay: _Replay | None = None
    head = writer.head()  # goes out with the first event: one write fewer per reply
    metrics.sse_streams(1)
    try:
        async for entry in entries:
            if entry is KEEPALIVE:
                yield head + writer.keepalive()
                head = b""
                continue
            kind, data = entry[1], entry[2]
            if kind == b"chunk":
                text = _CHUNK.decode(data).text
                if replay is not None:
                    taken = replay.take(text)
                    if taken is None:
                        finished = True  # the answer cannot be made whole: say so, stop
                        yield head + writer.error("RESTART_DIVERGED", _DIVERGED, 502)
                        on_abandon()
                        return
                    if replay.done:
                        replay = None
                    text = taken
                    if not text:
                        continue
                sent.append(text)
                yield head + writer.text(text)
                head = b""
            elif kind == b"restart":
                replay = _Replay("".join(sent)) if sent else None
            elif kind == b"end":
                finished = True
                end = _END.decode(data)
                out, streamed = head, "".join(sent)
                if replay is not None or streamed != end.content:
                    rest = _rest(end.content, streamed)
                    if rest is None:
                        yield out + writer.error("RESTART_DIVERGED", _DIVERGED, 502)
                        return
                    if rest:
                        out += writer.text(rest)
                yield out + writer.end(end)
                return
            elif kind == b"interrupt":
                finished = True
                yield head + writer.interrupt(_INTERRUPT.decode(data))
                return
            elif kind == b"error":
                finished = True
                err = _ERROR.decode(data)
                yield head + writer.error(err.error_code, err.error, status_for_code(err.error_code))
                return
            # start, tool_call, tool_result, step: agentpool's own events; these APIs have no place
            # for the server's tool steps (the caller's own tool calls come with the end)
    finally:
        metrics.sse_streams(-1)
        if not finished:
            on_abandon()


_DIVERGED = (
    "the agent restarted on another replica and its new answer differs from the text already "
    "streamed; send the request again"
)


def _rest(content: str, sent: str) -> str | None:
    """What of ``content`` was not streamed, or None if the stream said something else."""
    return content[len(sent) :] if content.startswith(sent) else None


def streaming(
    client: AgentPoolClient, started: Started, writer: Writer, headers: dict[str, str]
) -> StreamingResponse:
    entries = client.stream_raw(started.ticket, sub=started.sub, keepalive_s=KEEPALIVE_S)
    return StreamingResponse(
        translated(entries, writer, cancel_on_abandon(client, started.ticket.request_id)),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


def visible_pools(client: AgentPoolClient, principal: Principal) -> list[str]:
    """The pools this caller may name as ``model``: its tenant's, and every per-tenant template."""
    return [name for name, p in client.config.pools.items() if p.tenant == principal.tenant or p.per_tenant]


def created_at(end: End | Interrupt) -> int:
    return int(end.created_at or time.time())
