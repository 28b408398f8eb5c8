"""``POST /v1/chat/completions`` in OpenAI's format, and ``GET /v1/models`` (see :mod:`.compat`).

``model`` is a pool. Supported: system/developer, user, assistant (with ``tool_calls``) and tool
messages, text content (a string or text parts), ``stream`` with ``stream_options.include_usage``,
``temperature``/``top_p``/``max_tokens``/``max_completion_tokens`` within the agent type's bounds,
``tools`` and ``tool_choice`` (the caller's own tools: the model's calls come back as
``tool_calls``), ``n`` = 1, ``user``, ``metadata`` (``thread_id`` picks the thread),
``parallel_tool_calls``, ``store`` (accepted; agentpool stores by thread, not by completion).
Any other field is a 400 naming it, never silently ignored. The response ``id`` is the agentpool
request id (``GET /v1/requests/{id}`` works for it). A run paused for a human's approval answers
``finish_reason: "stop"`` with the text so far and ``agentpool.status: "interrupted"``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from agentpool.broker.client import check_thread_id
from agentpool.gateway import anthropic_compat, compat
from agentpool.gateway.http import JSON
from agentpool.shared.errors import AgentPoolError, BadRequest, NotFound
from agentpool.shared.messages import (
    Chat,
    End,
    Interrupt,
    Message,
    ToolCall,
    ToolChoice,
    ToolSpec,
    arguments_text,
    parse_arguments,
)

_JSON = msgspec.json.Encoder()
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]


class ChatTextPart(msgspec.Struct, kw_only=True):
    type: Literal["text"]  # images, audio and files are not supported
    text: str


Content = str | list[ChatTextPart] | None


class ChatFunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"


class ChatToolCall(msgspec.Struct, kw_only=True):
    id: str
    function: ChatFunctionCall
    type: Literal["function"] = "function"


class ChatSystemMessage(msgspec.Struct, tag="system", tag_field="role", kw_only=True):
    content: Content


class ChatDeveloperMessage(msgspec.Struct, tag="developer", tag_field="role", kw_only=True):
    content: Content


class ChatUserMessage(msgspec.Struct, tag="user", tag_field="role", kw_only=True):
    content: str | list[ChatTextPart]


class ChatAssistantMessage(msgspec.Struct, tag="assistant", tag_field="role", kw_only=True):
    content: Content = None
    tool_calls: list[ChatToolCall] | None = None


class ChatToolMessage(msgspec.Struct, tag="tool", tag_field="role", kw_only=True):
    tool_call_id: str
    content: Content


AnyMessage = (
    ChatSystemMessage | ChatDeveloperMessage | ChatUserMessage | ChatAssistantMessage | ChatToolMessage
)


class ChatFunction(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ChatFunctionTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: ChatFunction


class ChatNamedFunction(msgspec.Struct, kw_only=True):
    name: str


class ChatNamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: ChatNamedFunction


class ChatStreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    messages: Annotated[list[AnyMessage], msgspec.Meta(min_length=1, max_length=2000)]
    stream: bool = False
    stream_options: ChatStreamOptions | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1, description="choices per request: only 1")] = 1
    tools: Annotated[list[ChatFunctionTool], msgspec.Meta(max_length=128)] = []
    tool_choice: Literal["auto", "none", "required"] | ChatNamedToolChoice | None = None
    parallel_tool_calls: bool = True
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    metadata: Annotated[
        dict[str, Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)
    ] = {}
    store: bool | None = None


def _text(content: Content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def read_messages(raw: list[AnyMessage]) -> tuple[str, list[Message]]:
    """(system text, conversation); a tool result is named after its call."""
    system: list[str] = []
    out: list[Message] = []
    names: dict[str, str] = {}
    for m in raw:
        if isinstance(m, ChatSystemMessage | ChatDeveloperMessage):
            system.append(_text(m.content))
        elif isinstance(m, ChatUserMessage):
            out.append(Message("user", _text(m.content)))
        elif isinstance(m, ChatAssistantMessage):
            calls = [
                ToolCall(id=c.id, name=c.function.name, arguments=parse_arguments(c.function.arguments))
                for c in m.tool_calls or []
            ]
            names.update((c.id, c.name) for c in calls)
            out.append(Message("assistant", _text(m.content), tool_calls=calls))
        else:
            name = names.get(m.tool_call_id, "")
            out.append(Message("tool", _text(m.content), tool_call_id=m.tool_call_id, name=name))
    return "\n\n".join(s for s in system if s), out


def _choice(raw: Literal["auto", "none", "required"] | ChatNamedToolChoice | None) -> ToolChoice | None:
    if raw is None:
        return None
    if isinstance(raw, ChatNamedToolChoice):
        return ToolChoice(mode="tool", name=raw.function.name)
    return ToolChoice(mode=raw)


def read_chat(body: ChatCompletionBody, thread_id: str | None) -> Chat:
    if body.stream_options is not None and not body.stream:
        raise BadRequest(
            "stream_options: only with stream: true",
            error_code="VALIDATION_ERROR",
            details={"field": "stream_options"},
        )
    system, messages = read_messages(body.messages)
    stateless = thread_id is None
    compat.check_conversation(messages, stateless)
    tools = [
        ToolSpec(name=t.function.name, description=t.function.description, parameters=t.function.parameters)
        for t in body.tools
    ]
    choice = _choice(body.tool_choice)
    if choice is not None and choice.mode == "tool" and choice.name not in {t.name for t in tools}:
        raise BadRequest(
            f"tool_choice names {choice.name!r}, which is not in tools",
            error_code="VALIDATION_ERROR",
            details={"field": "tool_choice"},
        )
    return Chat(
        messages=messages,
        stateless=stateless,
        system=system,
        tools=tools,
        tool_choice=choice,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
    )


def _thread_id(request: Request, body: ChatCompletionBody) -> str | None:
    header = compat.thread_header(request)
    given = body.metadata.get("thread_id")
    if given is None:
        return header
    check_thread_id(given, "metadata.thread_id")
    if header is not None and header != given:
        raise BadRequest(
            "X-Thread-ID and metadata.thread_id name different threads",
            error_code="VALIDATION_ERROR",
            details={"field": "metadata.thread_id"},
        )
    return given


# --- answers


_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIShape:
    def error(self, err: AgentPoolError, headers: dict[str, str]) -> Response:
        return JSON(error_body(err.status, err.message, err.error_code, err.details), err.status, headers)


SHAPE = OpenAIShape()


def error_body(status: int, message: str, code: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = (details or {}).get("field")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": arguments_text(c)},
        }
        for c in calls
    ]


def _finish(end: End | compat.EndView) -> str:
    return {"tool_calls": "tool_calls", "max_tokens": "length"}.get(end.stop_reason, "stop")


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def _paused(event: Interrupt) -> dict[str, Any]:
    """agentpool's own field on an answer paused for approval (resume at /v1/requests/{id}/resume)."""
    return {
        "status": "interrupted",
        "request_id": event.request_id,
        "tool_call": {
            "id": event.tool_call.id,
            "name": event.tool_call.name,
            "arguments": event.tool_call.arguments,
        },
    }


def completion(model: str, final: End | Interrupt) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": final.content, "refusal": None}
    extra: dict[str, Any] = {}
    if isinstance(final, Interrupt):
        finish = "stop"
        extra["agentpool"] = _paused(final)
    else:
        finish = _finish(final)
        if final.tool_calls:
            message["tool_calls"] = _tool_calls(final.tool_calls)
            message["content"] = final.content or None
    return {
        "id": final.request_id,
        "object": "chat.completion",
        "created": compat.created_at(final),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(final.usage.input_tokens, final.usage.output_tokens),
        "system_fingerprint": None,
        **extra,
    }


_ROLE_DELTA = b'{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
_FINISH = {
    reason: b'{},"logprobs":null,"finish_reason":"' + reason.encode() + b'"}]}\n\n'
    for reason in ("stop", "length", "tool_calls")
}


class ChunkWriter:
    """``chat.completion.chunk`` events; the per-token one is two constant pieces around the text."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.include_usage = include_usage
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._base = _JSON.encode(head)[:-1] + b',"system_fingerprint":null'
        # With include_usage every chunk says "usage": null, but the last one, which has it.
        self._head = self._base + (b',"usage":null,"choices":' if include_usage else b',"choices":')
        self._delta_open = b"data: " + self._head + b'[{"index":0,"delta":'
        self._text_open = self._delta_open + b'{"content":'
        self._text_close = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def _chunk(self, choices: list[Any], **extra: Any) -> bytes:
        tail = b"".join(b"," + _JSON.encode(k) + b":" + _JSON.encode(v) for k, v in extra.items())
        return b"data: " + self._head + _JSON.encode(choices) + tail + b"}\n\n"

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def head(self) -> bytes:
        return self._delta_open + _ROLE_DELTA

    def text(self, text: str) -> bytes:
        return self._text_open + _JSON.encode(text) + self._text_close

    def end(self, end: compat.EndView) -> bytes:
        out = b""
        if end.tool_calls:
            calls = [{"index": i, **c} for i, c in enumerate(_tool_calls(end.tool_calls))]
            out += self._delta({"tool_calls": calls})
        out += self._delta_open + _FINISH[_finish(end)]
        return out + self._usage_and_done(end.usage.input_tokens, end.usage.output_tokens)

    def interrupt(self, event: Interrupt) -> bytes:
        finish = self._chunk(
            [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], agentpool=_paused(event)
        )
        return finish + self._usage_and_done(event.usage.input_tokens, event.usage.output_tokens)

    def _usage_and_done(self, input_tokens: int, output_tokens: int) -> bytes:
        usage = b""
        if self.include_usage:
            counts = _JSON.encode(_usage(input_tokens, output_tokens))
            usage = b"data: " + self._base + b',"choices":[],"usage":' + counts + b"}\n\n"
        return usage + b"data: [DONE]\n\n"

    def error(self, code: str, message: str, status: int) -> bytes:
        return b"data: " + _JSON.encode(error_body(status, message, code)) + b"\n\n"

    def keepalive(self) -> bytes:
        return b": keep-alive\n\n"


@compat.answers_errors_as(lambda _request: SHAPE)
async def chat_completions(request: Request) -> Response:
    client = compat.client_of(request)
    principal = await compat.caller(request)
    body = await compat.body_of(request, ChatCompletionBody, "Chat Completions")
    thread_id = _thread_id(request, body)
    chat = read_chat(body, thread_id)
    started, admitted = await compat.start(request, principal, body.model, chat, thread_id, body.stream)
    headers = compat.headers_of(started.ticket, admitted, started, chat.stateless)
    if body.stream:
        include = body.stream_options is not None and body.stream_options.include_usage
        writer = ChunkWriter(started.ticket.request_id, body.model, int(time.time()), include)
        return compat.streaming(client, started, writer, headers)
    final = await compat.final(client, started)
    headers["X-Agent-ID"] = final.agent_id
    return JSON(completion(body.model, final), headers=headers)


# --- models


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "agentpool"}


def _anthropic_model(name: str) -> dict[str, Any]:
    return {"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}


def _models_shape(request: Request) -> compat.Shape:
    """The models endpoints answer (and err) in Anthropic's shape when ``anthropic-version`` is sent."""
    return anthropic_compat.SHAPE if "anthropic-version" in request.headers else SHAPE


@compat.answers_errors_as(_models_shape)
async def list_models(request: Request) -> Response:
    """The pools this key may use, as models."""
    principal = await compat.caller(request)
    names = compat.visible_pools(compat.client_of(request), principal)
    if _models_shape(request) is anthropic_compat.SHAPE:
        data = [_anthropic_model(n) for n in names]
        first, last = (names[0], names[-1]) if names else (None, None)
        return JSON({"data": data, "has_more": False, "first_id": first, "last_id": last})
    return JSON({"object": "list", "data": [_model(n) for n in names]})


@compat.answers_errors_as(_models_shape)
async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    principal = await compat.caller(request)
    if name not in compat.visible_pools(compat.client_of(request), principal):
        raise NotFound(f"no model (pool) named {name!r}", error_code="POOL_NOT_FOUND", details={"pool": name})
    return JSON(_anthropic_model(name) if _models_shape(request) is anthropic_compat.SHAPE else _model(name))
