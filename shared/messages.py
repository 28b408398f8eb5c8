"""The wire contract between gateway/client, broker and workers.

Requests travel through RabbitMQ as msgpack (``REQUEST_ENCODER``). Reply events are written to
the Redis stream ``reply:{request_id}`` as two fields: ``t`` (the event type) and ``d`` (the event
as JSON), so the gateway forwards SSE ``data:`` lines without decoding them. ``v`` versions the
format: a reader refuses a version it does not know instead of misreading it.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

WIRE_VERSION = 1
RAW_ARGUMENTS_KEY = "_raw_arguments"  # a tool call whose arguments are not a JSON object, as written


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
    resume: Resume | None = None  # continues an interrupted run instead of starting one
    chat: Chat | None = None  # an OpenAI- or Anthropic-style call: its conversation and options
    keep_s: int = 0  # keep the result this long after its end (an Idempotency-Key's 24 h); 0: an hour
    # best-of-N fan-out: this request is run ``run`` (0-based) of ``runs``; ``seed`` varies its prompt.
    # A fan-out's runs read their thread and leave it as it was (none of N answers is the turn).
    run: int = 0
    runs: int = 0
    seed: int = 0


class ToolSpec(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A tool as a model is offered it: name, description, JSON Schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolChoice(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Whether the model must call a tool: ``auto``, ``none`` (never), ``required`` (some tool) or
    ``tool`` (the one named). It binds a run's first model call; ``none`` binds every call."""

    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str = ""


class Chat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a call in the OpenAI or Anthropic format brings beyond ``content``.

    ``messages`` is the conversation as the caller sent it (they send the whole history every
    time): the worker answers its trailing user or tool messages. On a thread (``stateless`` false)
    the stored history comes first and only those trailing messages are appended; a thread with no
    history yet starts from the caller's. ``stateless``: the messages are the whole conversation and
    nothing is stored. ``tools`` are the caller's own (client-side) tools: when the model calls one
    the run ends with ``end.tool_calls`` for the caller to run. ``system`` is added after the agent
    type's system prompt. The sampling fields override the agent type's for this request."""

    messages: list[Message]
    stateless: bool = False
    system: str = ""
    tools: list[ToolSpec] = []
    tool_choice: ToolChoice | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


class Resume(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A human's decision on the tool call an interrupted run waits for."""

    request_id: str  # the interrupted request
    approve: bool
    reason: str = ""


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
    """Drop the chunks shown so far: a new attempt begins (the earlier worker died or gave the
    request back), or (``reason`` gap) the reader found chunks of this attempt missing and the
    next chunk holds the whole text."""

    attempt: int
    agent_id: str
    reason: Literal["attempt", "gap"] = "attempt"


class ToolCall(msgspec.Struct, tag="tool_call", kw_only=True):
    """The model (or a python agent) asks for a tool; ``id`` pairs it with its :class:`ToolResult`."""

    id: str
    name: str
    arguments: dict[str, Any] = {}
    attempt: int = 1


class ToolResult(msgspec.Struct, tag="tool_result", kw_only=True):
    """What a tool returned (``content``), or why it failed (``is_error`` with ``error_code``)."""

    id: str
    name: str
    content: str
    is_error: bool = False
    error_code: str = ""  # TOOL_ERROR, TOOL_TIMEOUT, TOOL_ARGUMENTS_INVALID, TOOL_DENIED, ...
    duration_ms: float = 0.0
    attempt: int = 1


class Step(msgspec.Struct, tag="step", kw_only=True):
    """A custom step of an agent (a hand-off, a plan...): ``name`` and JSON ``data``."""

    name: str
    data: Any = None
    attempt: int = 1


StepEvent = ToolCall | ToolResult | Step


class End(msgspec.Struct, tag="end", kw_only=True):
    request_id: str
    thread_id: str
    agent_id: str
    deployment: str = ""  # the agent's deployment (A/B: which arm answered)
    content: str
    usage: Usage
    timings: Timings
    created_at: float
    attempt: int = 1
    steps: list[StepEvent] = []  # tool calls, tool results and custom steps, in order
    resumed_from: str | None = None  # the interrupted request this run continued
    stop_reason: Literal["end", "max_tokens", "tool_calls"] = "end"  # why the model stopped
    tool_calls: list[ToolCall] = []  # the caller's own tools the model called (stop_reason tool_calls)


class Interrupt(msgspec.Struct, tag="interrupt", kw_only=True):
    """The run paused before ``tool_call``, which needs a human's approval: resume it by id.

    A final event like ``end``: the request is waiting, its thread is marked so."""

    request_id: str
    thread_id: str
    agent_id: str
    tool_call: ToolCall
    deployment: str = ""
    content: str = ""  # text streamed before the pause
    usage: Usage = msgspec.field(default_factory=Usage)
    steps: list[StepEvent] = []
    created_at: float = 0.0
    attempt: int = 1
    resumed_from: str | None = None


class Error(msgspec.Struct, tag="error", kw_only=True):
    request_id: str
    error_code: str
    error: str
    attempt: int = 0
    retryable: bool = False


Event = Start | Chunk | Restart | ToolCall | ToolResult | Step | End | Interrupt | Error
EventType = Literal[
    "start", "chunk", "restart", "tool_call", "tool_result", "step", "end", "interrupt", "error"
]
FINAL_TYPES = frozenset({b"end", b"error", b"interrupt"})


class Message(msgspec.Struct, array_like=True, omit_defaults=True):
    """One message of a conversation: a thread's history entry (``thread:{tenant}:{thread_id}``)
    and what a model call is given, independent of any provider's API format.

    ``assistant`` messages may carry ``tool_calls``; a ``tool`` message is the result of the call
    ``tool_call_id``. Stored as a msgpack array: the first three fields are the format of the
    earlier text-only turns, so old history still decodes.
    """

    role: Literal["user", "assistant", "tool"]
    content: str
    request_id: str = ""
    tool_calls: list[ToolCall] = []
    tool_call_id: str = ""
    name: str = ""  # the tool's name, on a tool message
    is_error: bool = False


MESSAGE_ENCODER = msgspec.msgpack.Encoder()
MESSAGE_DECODER = msgspec.msgpack.Decoder(Message)


def parse_arguments(text: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the OpenAI API carries them (text); anything but a JSON
    object is kept as written under :data:`RAW_ARGUMENTS_KEY`, so the tool refuses it as invalid,
    the step shows what the model wrote, and it goes back to the model as it came."""
    try:
        arguments = msgspec.json.decode(text or "{}")
    except msgspec.DecodeError:
        return {RAW_ARGUMENTS_KEY: text}
    return arguments if isinstance(arguments, dict) else {RAW_ARGUMENTS_KEY: text}


def arguments_text(call: ToolCall) -> str:
    """The inverse of :func:`parse_arguments`."""
    raw = call.arguments.get(RAW_ARGUMENTS_KEY)
    if isinstance(raw, str) and len(call.arguments) == 1:
        return raw
    return EVENT_ENCODER.encode(call.arguments).decode()


REQUEST_ENCODER = msgspec.msgpack.Encoder()
REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
EVENT_ENCODER = msgspec.json.Encoder()
EVENT_DECODER = msgspec.json.Decoder(Event)


def event_fields(event: Event) -> dict[bytes, bytes]:
    """The stream entry for ``event``: ``{t: type, d: json}``."""
    return {b"t": type(event).__struct_config__.tag.encode(), b"d": EVENT_ENCODER.encode(event)}  # type: ignore[union-attr]
