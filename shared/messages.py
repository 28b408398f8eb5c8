"""The wire contract between gateway/client, broker and workers.

Requests travel through RabbitMQ as msgpack (``REQUEST_ENCODER``). Reply events are written to
the Redis stream ``reply:{request_id}`` as two fields: ``t`` (the event type) and ``d`` (the event
as JSON), so the gateway forwards SSE ``data:`` lines without decoding them. ``v`` versions the
format: a reader refuses a version it does not know instead of misreading it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

WIRE_VERSION = 1


class Request(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message in. ``request_id`` is also the AMQP ``message_id``."""

    v: int = WIRE_VERSION
    request_id: str
    pool: str
    tenant: str
    thread_id: str
    content: str
    created_at: float  # unix seconds, set by the publisher
    start_by: float | None = None  # unix seconds: skip with QUEUE_TIMEOUT if not started by then
    replica: str = ""  # the replica the router chose (for depth accounting and metrics)
    tier: str = ""  # routing tier that chose it: sticky, spill, overflow
    woke: bool = False  # its pool had no live replica when it was published: it waited for one
    context_variables: dict[str, str] = {}
    traceparent: str | None = None


class Usage(msgspec.Struct, omit_defaults=True):
    input_tokens: int = 0
    output_tokens: int = 0


class Timings(msgspec.Struct, omit_defaults=True):
    """Milliseconds. ``queue_wait_ms``: published -> a worker started it."""

    queue_wait_ms: float = 0.0
    ttft_ms: float = 0.0  # worker start -> first token from the provider
    generation_ms: float = 0.0  # worker start -> last token
    total_ms: float = 0.0  # published -> end written
    cold_start_ms: float = 0.0  # >0 when the request waited for a pool to wake


class Start(msgspec.Struct, tag="start", kw_only=True):
    request_id: str
    agent_id: str
    attempt: int = 1
    queue_wait_ms: float = 0.0
    traceparent: str | None = None  # the request's W3C trace context, when the caller sent one


class Chunk(msgspec.Struct, tag="chunk", kw_only=True):
    text: str
    attempt: int = 1


class Restart(msgspec.Struct, tag="restart", kw_only=True):
    """A new attempt begins (the earlier worker died or gave the request back): drop its chunks."""

    attempt: int
    agent_id: str


class End(msgspec.Struct, tag="end", kw_only=True):
    request_id: str
    thread_id: str
    agent_id: str
    content: str
    usage: Usage
    timings: Timings
    created_at: float
    attempt: int = 1


class Error(msgspec.Struct, tag="error", kw_only=True):
    request_id: str
    error_code: str
    error: str
    attempt: int = 0
    retryable: bool = False


Event = Start | Chunk | Restart | End | Error
EventType = Literal["start", "chunk", "restart", "end", "error"]
FINAL_TYPES = frozenset({b"end", b"error"})

REQUEST_ENCODER = msgspec.msgpack.Encoder()
REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
EVENT_ENCODER = msgspec.json.Encoder()
EVENT_DECODER = msgspec.json.Decoder(Event)


def event_fields(event: Event) -> dict[bytes, bytes]:
    """The stream entry for ``event``: ``{t: type, d: json}``."""
    return {b"t": type(event).__struct_config__.tag.encode(), b"d": EVENT_ENCODER.encode(event)}  # type: ignore[union-attr]


class Turn(msgspec.Struct, array_like=True):
    """One message of a thread's history, as stored in ``thread:{tenant}:{thread_id}``."""

    role: Literal["user", "assistant"]
    content: str
    request_id: str = ""


TURN_ENCODER = msgspec.msgpack.Encoder()
TURN_DECODER = msgspec.msgpack.Decoder(Turn)
