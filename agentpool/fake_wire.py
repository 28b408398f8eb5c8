"""The two wire formats the fake LLM server speaks: OpenAI Chat Completions and Anthropic Messages.

Each :class:`Api` reads a request body into a provider-neutral :class:`Call` (tool calls and tool
results become :class:`~shared.messages.Message` fields) and writes the answer back the way the
real API does, as one JSON body or as SSE events, so the official SDKs parse it. Tool calls stream
as the real APIs stream them: a start per call, then its JSON arguments in fragments. A request the
real API would refuse (a tool result answering no tool call, a tool call left without a result)
gets a 400 in that API's error shape.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from agentpool.shared.fake_model import FakeAnswer
from agentpool.shared.messages import Message, ToolCall

MODELS = ("fake-1",)
ARGUMENT_PIECE_CHARS = 8  # a tool call's JSON arguments stream in fragments this long
_JSON = msgspec.json.Encoder()


class Reject(Exception):
    """A request the fake refuses; rendered in the calling API's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Call:
    """A model call, as read from either API's request body."""

    model: str
    system: str
    messages: list[Message]
    max_tokens: int | None
    stream: bool
    include_usage: bool = False
    tool_names: frozenset[str] = frozenset()


@dataclass
class Reply:
    """What the fake answers to a call, and how fast."""

    id: str
    model: str
    answer: FakeAnswer
    input_tokens: int
    ttft_s: float
    gap_s: float
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokens(self) -> list[str]:
        return self.answer.tokens

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.answer.tool_calls

    @property
    def truncated(self) -> bool:
        return self.answer.truncated


def text_of(content: Any) -> str:
    """Text of a message content: a string, or a list of blocks of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise Reject(400, "content: expected a string or a list of content blocks")


def _objects(raw: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise Reject(400, f"{where}: expected a list of objects")
    return raw


def check_tool_pairing(messages: Sequence[Message]) -> None:
    """Refuse what the real APIs refuse: every tool call answered, by results that directly follow."""
    waiting: set[str] = set()
    for m in messages:
        if m.role == "tool":
            if m.tool_call_id not in waiting:
                raise Reject(
                    400, f"tool result {m.tool_call_id!r} answers no tool call of the message before it"
                )
            waiting.discard(m.tool_call_id)
            continue
        if waiting:
            raise Reject(400, f"tool calls without a result right after them: {sorted(waiting)}")
        waiting = {c.id for c in m.tool_calls}
    if waiting:
        raise Reject(400, f"tool calls without a result right after them: {sorted(waiting)}")


def arguments_json(call: ToolCall) -> str:
    return _JSON.encode(call.arguments).decode()


def fragments(text: str) -> list[str]:
    """``text`` in pieces of :data:`ARGUMENT_PIECE_CHARS`, as a model streams tool arguments."""
    return [text[i : i + ARGUMENT_PIECE_CHARS] for i in range(0, len(text), ARGUMENT_PIECE_CHARS)] or [""]


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _JSON.encode(data) + b"\n\n"


class Api:
    """One wire format: how to read a call and write replies and errors."""

    name = ""
    id_prefix = ""
    tool_id_prefix = ""
    error_types: dict[int, str] = {}

    def authorized(self, request: Request, api_key: str) -> bool:
        return request.headers.get("authorization") == f"Bearer {api_key}"

    def parse(self, request: Request, body: Any) -> Call:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
        body = _JSON.encode(self.error_body(status, message))
        return Response(body, status, headers=headers, media_type="application/json")

    def complete(self, call: Call, reply: Reply) -> dict[str, Any]:
        raise NotImplementedError

    def sse_head(self, call: Call, reply: Reply) -> bytes:
        raise NotImplementedError

    def sse_body(self, call: Call, reply: Reply) -> list[bytes]:
        """The events between head and tail, each a unit the server paces (and a drop may cut)."""
        raise NotImplementedError

    def sse_tail(self, call: Call, reply: Reply) -> bytes:
        raise NotImplementedError

    def models(self) -> dict[str, Any]:
        raise NotImplementedError


class OpenAIApi(Api):
    name = "openai"
    id_prefix = "chatcmpl-fake"
    tool_id_prefix = "call_"
    error_types = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        429: "requests",
        500: "server_error",
        504: "timeout",
    }

    def parse(self, request: Request, body: Any) -> Call:
        raw = body.get("messages")
        if not raw:
            raise Reject(400, "messages: expected a non-empty list")
        systems = [m for m in _objects(raw, "messages") if m.get("role") in ("system", "developer")]
        options = body.get("stream_options") or {}
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and not isinstance(max_tokens, int):
            raise Reject(400, "max_completion_tokens: expected an integer")
        messages = openai_messages(raw)
        check_tool_pairing(messages)
        return Call(
            model=str(body.get("model", "")),
            system="\n".join(text_of(m.get("content") or "") for m in systems),
            messages=messages,
            max_tokens=max_tokens,
            stream=bool(body.get("stream")),
            include_usage=bool(options.get("include_usage")),
            tool_names=openai_tool_names(body.get("tools")),
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        kind = self.error_types.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def _usage(self, reply: Reply) -> dict[str, int]:
        out = reply.answer.output_tokens
        return {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": out,
            "total_tokens": reply.input_tokens + out,
        }

    def _finish(self, reply: Reply) -> str:
        if reply.tool_calls:
            return "tool_calls"
        return "length" if reply.truncated else "stop"

    def complete(self, call: Call, reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.answer.text, "refusal": None}
        if reply.tool_calls:
            message["content"] = None
            message["tool_calls"] = [_openai_tool_call(c) for c in reply.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish(reply)}
        return {
            "id": reply.id,
            "object": "chat.completion",
            "created": reply.created,
            "model": reply.model,
            "choices": [choice],
            "usage": self._usage(reply),
        }

    def _chunk(self, call: Call, reply: Reply, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": reply.id,
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if call.include_usage:
            chunk["usage"] = None
        return sse(chunk | extra)

    def _delta(self, call: Call, reply: Reply, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._chunk(call, reply, [choice])

    def sse_head(self, call: Call, reply: Reply) -> bytes:
        return self._delta(call, reply, {"role": "assistant", "content": None if reply.tool_calls else ""})

    def sse_body(self, call: Call, reply: Reply) -> list[bytes]:
        if not reply.tool_calls:
            return [self._delta(call, reply, {"content": token}) for token in reply.tokens]
        out = []
        for i, c in enumerate(reply.tool_calls):
            start = {
                "index": i,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": ""},
            }
            out.append(self._delta(call, reply, {"tool_calls": [start]}))
            for piece in fragments(arguments_json(c)):
                more = {"index": i, "function": {"arguments": piece}}
                out.append(self._delta(call, reply, {"tool_calls": [more]}))
        return out

    def sse_tail(self, call: Call, reply: Reply) -> bytes:
        out = self._delta(call, reply, {}, self._finish(reply))
        if call.include_usage:
            out += self._chunk(call, reply, [], usage=self._usage(reply))
        return out + b"data: [DONE]\n\n"

    def models(self) -> dict[str, Any]:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "agentpool"} for m in MODELS]
        return {"object": "list", "data": data}


def _openai_tool_call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments_json(c)}}


def openai_tool_names(raw: Any) -> frozenset[str]:
    """The names in ``tools=[{"type": "function", "function": {"name": ...}}]``."""
    names = []
    for i, tool in enumerate(_objects(raw or [], "tools")):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Reject(400, f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        names.append(fn["name"])
    return frozenset(names)


def openai_messages(raw: Any) -> list[Message]:
    """User, assistant (with ``tool_calls``) and ``tool`` messages; a tool result's name is its call's."""
    out: list[Message] = []
    names: dict[str, str] = {}
    for m in _objects(raw, "messages"):
        role, content = m.get("role"), text_of(m.get("content") or "")
        if role == "user":
            out.append(Message("user", content))
        elif role == "assistant":
            calls = [_openai_call(c) for c in _objects(m.get("tool_calls") or [], "tool_calls")]
            names.update((c.id, c.name) for c in calls)
            out.append(Message("assistant", content, tool_calls=calls))
        elif role == "tool":
            call_id = str(m.get("tool_call_id", ""))
            out.append(Message("tool", content, tool_call_id=call_id, name=names.get(call_id, "")))
    return out


def _openai_call(raw: dict[str, Any]) -> ToolCall:
    fn = raw.get("function")
    if not isinstance(fn, dict) or not isinstance(raw.get("id"), str) or not isinstance(fn.get("name"), str):
        raise Reject(400, "tool_calls: expected {'id': ..., 'function': {'name': ..., 'arguments': ...}}")
    try:
        arguments = msgspec.json.decode(fn.get("arguments") or "{}")
    except msgspec.DecodeError:
        arguments = {}  # the real API passes a model's broken JSON back as it was written
    return ToolCall(id=raw["id"], name=fn["name"], arguments=arguments if isinstance(arguments, dict) else {})


class AnthropicApi(Api):
    name = "anthropic"
    id_prefix = "msg_fake"
    tool_id_prefix = "toolu_"
    error_types = {
        400: "invalid_request_error",
        401: "authentication_error",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
    }
    NO_SAMPLING_SINCE = "2026-10-21"  # the API version that refuses temperature/top_p/top_k

    def authorized(self, request: Request, api_key: str) -> bool:
        return request.headers.get("x-api-key") == api_key or super().authorized(request, api_key)

    def parse(self, request: Request, body: Any) -> Call:
        version = request.headers.get("anthropic-version", "")
        sampling = [k for k in ("temperature", "top_p", "top_k") if k in body]
        if sampling and version >= self.NO_SAMPLING_SINCE:
            raise Reject(400, f"{sampling[0]}: Extra inputs are not permitted")
        if not isinstance(body.get("max_tokens"), int):
            raise Reject(400, "max_tokens: Field required")
        if not body.get("messages"):
            raise Reject(400, "messages: expected a non-empty list")
        messages = anthropic_messages(body["messages"])
        check_tool_pairing(messages)
        return Call(
            model=str(body.get("model", "")),
            system=text_of(body.get("system") or ""),
            messages=messages,
            max_tokens=body["max_tokens"],
            stream=bool(body.get("stream")),
            tool_names=anthropic_tool_names(body.get("tools")),
        )

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = self.error_types.get(status, "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def _message(self, reply: Reply, content: list[Any], stop: str | None, out: int) -> dict[str, Any]:
        return {
            "id": reply.id,
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": out},
        }

    def _stop(self, reply: Reply) -> str:
        if reply.tool_calls:
            return "tool_use"
        return "max_tokens" if reply.truncated else "end_turn"

    def complete(self, call: Call, reply: Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = [_tool_use(c, c.arguments) for c in reply.tool_calls]
        content = content or [{"type": "text", "text": reply.answer.text}]
        return self._message(reply, content, self._stop(reply), reply.answer.output_tokens)

    def sse_head(self, call: Call, reply: Reply) -> bytes:
        start = sse({"type": "message_start", "message": self._message(reply, [], None, 1)}, "message_start")
        ping = sse({"type": "ping"}, "ping")
        if reply.tool_calls:
            return start + ping
        return start + _block_start(0, {"type": "text", "text": ""}) + ping

    def sse_body(self, call: Call, reply: Reply) -> list[bytes]:
        if not reply.tool_calls:
            return [_block_delta(0, {"type": "text_delta", "text": token}) for token in reply.tokens]
        out = []
        for i, c in enumerate(reply.tool_calls):
            out.append(_block_start(i, _tool_use(c, {})))
            out.extend(
                _block_delta(i, {"type": "input_json_delta", "partial_json": piece})
                for piece in fragments(arguments_json(c))
            )
            out.append(_block_stop(i))
        return out

    def sse_tail(self, call: Call, reply: Reply) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop(reply), "stop_sequence": None},
            "usage": {"output_tokens": reply.answer.output_tokens},
        }
        stop = b"" if reply.tool_calls else _block_stop(0)
        return stop + sse(delta, "message_delta") + sse({"type": "message_stop"}, "message_stop")

    def models(self) -> dict[str, Any]:
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in MODELS
        ]
        return {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}


def _tool_use(c: ToolCall, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": c.id, "name": c.name, "input": arguments}


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")


def _block_stop(index: int) -> bytes:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop")


def anthropic_tool_names(raw: Any) -> frozenset[str]:
    """The names in ``tools=[{"name": ..., "input_schema": {...}}]``."""
    names = []
    for i, tool in enumerate(_objects(raw or [], "tools")):
        if not isinstance(tool.get("name"), str):
            raise Reject(400, f"tools.{i}.name: Field required")
        if not isinstance(tool.get("input_schema"), dict):
            raise Reject(400, f"tools.{i}.input_schema: Field required")
        names.append(tool["name"])
    return frozenset(names)


def anthropic_messages(raw: Any) -> list[Message]:
    """Assistant ``tool_use`` blocks become tool calls; each user ``tool_result`` block, a tool message."""
    out: list[Message] = []
    names: dict[str, str] = {}
    for m in _objects(raw, "messages"):
        if m.get("role") == "assistant":
            out.append(_anthropic_assistant(m.get("content", "")))
            names.update((c.id, c.name) for c in out[-1].tool_calls)
        elif m.get("role") == "user":
            out.extend(_anthropic_user(m.get("content", ""), names))
    return out


def _anthropic_assistant(content: Any) -> Message:
    if isinstance(content, str):
        return Message("assistant", content)
    blocks = _objects(content, "content")
    calls = [
        ToolCall(id=str(b.get("id", "")), name=str(b.get("name", "")), arguments=_input(b))
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    return Message("assistant", text_of(blocks), tool_calls=calls)


def _input(block: dict[str, Any]) -> dict[str, Any]:
    arguments = block.get("input")
    if not isinstance(arguments, dict):
        raise Reject(400, "tool_use.input: Input should be a valid dictionary")
    return arguments


def _anthropic_user(content: Any, names: Mapping[str, str]) -> list[Message]:
    """Text blocks and tool results in their order: a tool result after text is refused as the API does."""
    if isinstance(content, str):
        return [Message("user", content)]
    out: list[Message] = []
    text: list[str] = []
    for b in _objects(content, "content"):
        if b.get("type") == "text":
            text.append(str(b.get("text", "")))
        elif b.get("type") == "tool_result":
            if text:
                out.append(Message("user", "".join(text)))
                text = []
            call_id = str(b.get("tool_use_id", ""))
            result = text_of(b.get("content", ""))
            error = bool(b.get("is_error"))
            out.append(
                Message("tool", result, tool_call_id=call_id, name=names.get(call_id, ""), is_error=error)
            )
    if text or not out:
        out.append(Message("user", "".join(text)))
    return out


OPENAI, ANTHROPIC = OpenAIApi(), AnthropicApi()
