"""``POST /v1/messages`` in Anthropic's format (see :mod:`.compat`).

``model`` is a pool; ``max_tokens`` is required and at most the agent type's. Supported: ``system``
(a string or text blocks), messages with text, ``tool_use`` and ``tool_result`` blocks, ``tools``
(the caller's own: the model's calls come back as ``tool_use`` blocks with ``stop_reason:
"tool_use"``), ``tool_choice``, ``stream``, ``metadata.user_id``, and ``temperature``/``top_p`` when
the pool's provider takes them. The ``anthropic-version`` header is accepted (any version).
Anything else (``stop_sequences``, ``thinking``, images, ``top_k``...) is a 400 naming it. A run
paused for a human's approval answers ``stop_reason: "pause_turn"`` with the text so far.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from agentpool.gateway import compat
from agentpool.gateway.http import JSON
from agentpool.shared.errors import AgentPoolError, BadRequest
from agentpool.shared.messages import Chat, End, Interrupt, Message, ToolCall, ToolChoice, ToolSpec

_JSON = msgspec.json.Encoder()


class AnthropicTextBlock(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class AnthropicBlock(msgspec.Struct, kw_only=True):
    """A content block of any type; the types agentpool reads are checked in :func:`read_messages`."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthropicTextBlock] | None = None
    is_error: bool = False


class AnthropicMessage(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[AnthropicBlock], msgspec.Meta(min_length=1)]


class AnthropicTool(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class AnthropicToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class AnthropicMetadata(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class MessagesBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    messages: Annotated[list[AnthropicMessage], msgspec.Meta(min_length=1, max_length=2000)]
    system: str | list[AnthropicTextBlock] | None = None
    stream: bool = False
    tools: Annotated[list[AnthropicTool], msgspec.Meta(max_length=128)] = []
    tool_choice: AnthropicToolChoice | None = None
    metadata: AnthropicMetadata | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None


def _refuse(where: str, why: str) -> BadRequest:
    return BadRequest(f"{where}: {why}", error_code="VALIDATION_ERROR", details={"field": where})


def _text_of(blocks: str | list[AnthropicTextBlock] | None, where: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    out = []
    for i, b in enumerate(blocks):
        if b.type != "text" or b.text is None:
            raise _refuse(f"{where}[{i}]", f"blocks of type {b.type!r} are not supported here (text only)")
        out.append(b.text)
    return "".join(out)


def read_messages(raw: list[AnthropicMessage]) -> list[Message]:
    """Provider-neutral messages: an assistant turn's ``tool_use`` blocks become its tool calls, a
    user turn's ``tool_result`` blocks become tool messages (before the turn's text)."""
    out: list[Message] = []
    names: dict[str, str] = {}
    for i, m in enumerate(raw):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append(Message(m.role, m.content))
            continue
        text: list[str] = []
        calls: list[ToolCall] = []
        results: list[Message] = []
        for j, b in enumerate(m.content):
            at = f"{where}[{j}]"
            if b.type == "text" and b.text is not None:
                text.append(b.text)
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.id or not b.name or b.input is None:
                    raise _refuse(at, "a tool_use block needs id, name and input")
                calls.append(ToolCall(id=b.id, name=b.name, arguments=b.input))
                names[b.id] = b.name
            elif b.type == "tool_result" and m.role == "user":
                if not b.tool_use_id:
                    raise _refuse(at, "a tool_result block needs tool_use_id")
                content = _text_of(b.content, f"{at}.content")
                results.append(
                    Message(
                        "tool",
                        content,
                        tool_call_id=b.tool_use_id,
                        name=names.get(b.tool_use_id, ""),
                        is_error=b.is_error,
                    )
                )
            else:
                raise _refuse(f"{at}.type", f"{b.type!r} blocks are not supported in a {m.role} message")
        if m.role == "assistant":
            out.append(Message("assistant", "".join(text), tool_calls=calls))
        else:
            out.extend(results)
            if text or not results:
                out.append(Message("user", "".join(text)))
    return out


def _choice(raw: AnthropicToolChoice | None) -> ToolChoice | None:
    if raw is None:
        return None
    if raw.type == "tool":
        if not raw.name:
            raise _refuse("tool_choice.name", "required when type is 'tool'")
        return ToolChoice(mode="tool", name=raw.name)
    return ToolChoice(mode={"auto": "auto", "any": "required", "none": "none"}[raw.type])  # type: ignore[arg-type]


def read_chat(body: MessagesBody, thread_id: str | None) -> Chat:
    messages = read_messages(body.messages)
    stateless = thread_id is None
    compat.check_conversation(messages, stateless)
    tools = [ToolSpec(name=t.name, description=t.description, parameters=t.input_schema) for t in body.tools]
    choice = _choice(body.tool_choice)
    if choice is not None and choice.mode == "tool" and choice.name not in {t.name for t in tools}:
        raise _refuse("tool_choice.name", f"{choice.name!r} is not in tools")
    return Chat(
        messages=messages,
        stateless=stateless,
        system=_text_of(body.system, "system"),
        tools=tools,
        tool_choice=choice,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_tokens,
    )


# --- answers

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    """Anthropic's error shape, with agentpool's own ``code`` next to the API's fields."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message, "code": code}}


class AnthropicShape:
    def error(self, err: AgentPoolError, headers: dict[str, str]) -> Response:
        return JSON(error_body(err.status, err.message, err.error_code), err.status, headers)


SHAPE = AnthropicShape()


def _stop(final: End | Interrupt | compat.EndView) -> str:
    if isinstance(final, Interrupt):
        return "pause_turn"
    return {"tool_calls": "tool_use", "max_tokens": "max_tokens"}.get(final.stop_reason, "end_turn")


def _blocks(final: End | Interrupt) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": final.content}] if final.content else []
    if isinstance(final, End):
        blocks += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in final.tool_calls
        ]
    return blocks or [{"type": "text", "text": ""}]


def message(model: str, final: End | Interrupt) -> dict[str, Any]:
    return {
        "id": final.request_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _blocks(final),
        "stop_reason": _stop(final),
        "stop_sequence": None,
        "usage": {"input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens},
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _JSON.encode({"type": kind, **data}) + b"\n\n"


class EventWriter:
    """Anthropic's stream events; the text block opens with the first text, tool_use blocks follow."""

    _DELTA_OPEN = (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
    )

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self._text_open = False

    def head(self) -> bytes:
        start: dict[str, Any] = {
            "id": self.request_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event("message_start", {"message": start})

    def text(self, text: str) -> bytes:
        out = b""
        if not self._text_open:
            self._text_open = True
            out = _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        return out + self._DELTA_OPEN + _JSON.encode(text) + b"}}\n\n"

    def _close(self, final: compat.EndView | Interrupt) -> bytes:
        out = b""
        index = 0
        if self._text_open:
            out += _event("content_block_stop", {"index": 0})
            index = 1
        calls = [] if isinstance(final, Interrupt) else final.tool_calls
        for call in calls:
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            out += _event("content_block_start", {"index": index, "content_block": block})
            delta = {"type": "input_json_delta", "partial_json": _JSON.encode(call.arguments).decode()}
            out += _event("content_block_delta", {"index": index, "delta": delta})
            out += _event("content_block_stop", {"index": index})
            index += 1
        if index == 0:  # an empty answer still has its (empty) text block
            out += _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            out += _event("content_block_stop", {"index": 0})
        usage = {"input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens}
        out += _event(
            "message_delta", {"delta": {"stop_reason": _stop(final), "stop_sequence": None}, "usage": usage}
        )
        return out + _event("message_stop", {})

    def end(self, end: compat.EndView) -> bytes:
        return self._close(end)

    def interrupt(self, event: Interrupt) -> bytes:
        return self._close(event)

    def error(self, code: str, message: str, status: int) -> bytes:
        return b"event: error\ndata: " + _JSON.encode(error_body(status, message, code)) + b"\n\n"

    def keepalive(self) -> bytes:
        return _event("ping", {})


@compat.answers_errors_as(lambda _request: SHAPE)
async def messages(request: Request) -> Response:
    client = compat.client_of(request)
    principal = await compat.caller(request)
    body = await compat.body_of(request, MessagesBody, "Messages")
    thread_id = compat.thread_header(request)
    chat = read_chat(body, thread_id)
    started, admitted = await compat.start(request, principal, body.model, chat, thread_id, body.stream)
    headers = compat.headers_of(started.ticket, admitted, started, chat.stateless)
    if body.stream:
        return compat.streaming(client, started, EventWriter(started.ticket.request_id, body.model), headers)
    final = await compat.final(client, started)
    headers["X-Agent-ID"] = final.agent_id
    return JSON(message(body.model, final), headers=headers)
