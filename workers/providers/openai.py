"""The OpenAI Chat Completions provider, on the official ``openai`` SDK.

Text streams through ``emit`` as the model writes it; usage comes from the last chunk
(``stream_options.include_usage``). Tools are offered as ``function`` tools; the calls the model
streams are put together by index and their JSON arguments parsed. Arguments that are not a JSON
object are kept as written under :data:`RAW_ARGUMENTS_KEY` (``{"_raw_arguments": "..."}``), so the
tool refuses them as invalid and the step shows what the model wrote; sent back in the history,
they go as they came. SDK retries are off because retrying is the caller's call
(:mod:`agentpool.workers.providers.retry`), made only while nothing was emitted. The reply length is capped
with ``max_completion_tokens``, which replaced the deprecated ``max_tokens``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import httpx2
import msgspec
import openai
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolChoiceOptionParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall
from openai.types.shared_params import FunctionDefinition

from agentpool.shared.config import AgentType
from agentpool.shared.config import Provider as ProviderConfig
from agentpool.shared.errors import ProviderError
from agentpool.shared.messages import (
    Message,
    ToolCall,
    ToolChoice,
    Usage,
    arguments_text,
    parse_arguments,
)
from agentpool.workers.providers.base import (
    Emit,
    Prompt,
    Provider,
    Reply,
    ToolSpec,
    api_key,
    flatten_tool_steps,
    retry_after_s,
)

log = logging.getLogger(__name__)

WARM_TIMEOUT_S = 5.0
SDK_ERRORS = (openai.OpenAIError, httpx2.HTTPError)  # httpx2: failures while reading a stream
_JSON = msgspec.json.Encoder()


class OpenAIProvider(Provider):
    kind = "openai"

    def __init__(self, config: ProviderConfig, agent_type: AgentType) -> None:
        super().__init__(config, agent_type)
        self._client: openai.AsyncOpenAI | None = None
        self._closed = False

    def _sdk(self) -> openai.AsyncOpenAI:
        """The SDK client, made on first use so a missing key surfaces as a ProviderError."""
        if self._closed:
            raise ProviderError("the openai provider is closed", error_code="PROVIDER_CLOSED")
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.config.base_url,
                api_key=api_key(self.config),
                timeout=self.agent_type.timeout_s,
                max_retries=0,
            )
        return self._client

    async def warm(self) -> None:
        """Open the connection pool and check the key with a cheap ``GET /models``."""
        try:
            await self._sdk().models.list(timeout=WARM_TIMEOUT_S)
        except openai.NotFoundError:
            log.warning("%s has no /models; the key is checked on the first request", self.config.base_url)
        except SDK_ERRORS as e:
            raise translate_error(e) from e

    async def generate(
        self, prompt: Prompt, emit: Emit, extra_headers: Mapping[str, str] | None = None
    ) -> Reply:
        """Stream one reply; ``extra_headers`` go on the HTTP request (e.g. fake-server knobs)."""
        try:
            return await self._stream(prompt, emit, extra_headers)
        except SDK_ERRORS as e:
            raise translate_error(e) from e

    async def _stream(self, prompt: Prompt, emit: Emit, extra_headers: Mapping[str, str] | None) -> Reply:
        stream = await self._sdk().chat.completions.create(
            model=self.model,
            messages=_messages(prompt),
            tools=[_tool(t) for t in prompt.tools] or openai.omit,
            tool_choice=_tool_choice(prompt.tool_choice) if prompt.tools else openai.omit,
            temperature=_given(prompt.temperature(self.agent_type)),
            top_p=_given(prompt.top_p(self.agent_type)),
            max_completion_tokens=prompt.max_tokens(self.agent_type),
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=dict(extra_headers or {}),
        )
        reading = _Reading(emit)
        async with stream:
            async for chunk in stream:
                reading.add(chunk)
        return reading.reply()

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()
            self._client = None


class _Reading:
    """One streamed reply as it arrives: text to ``emit``, tool call pieces by index, usage, finish."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.text: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: Usage | None = None
        self.finish: str | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        if chunk.usage is not None:
            self.usage = Usage(
                input_tokens=chunk.usage.prompt_tokens, output_tokens=chunk.usage.completion_tokens
            )
        for choice in chunk.choices:
            if choice.delta.content:
                self.text.append(choice.delta.content)
                self.emit(choice.delta.content)
            for piece in choice.delta.tool_calls or ():
                self._add_call(piece)
            self.finish = choice.finish_reason or self.finish

    def _add_call(self, piece: ChoiceDeltaToolCall) -> None:
        """The first piece of a call brings its id and name, the later ones its arguments' text."""
        call = self.calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = call["id"] or piece.id or ""
        if piece.function is not None:
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""

    def reply(self) -> Reply:
        if self.finish is None:
            raise ProviderError(
                "openai stream ended without a finish_reason",
                error_code="PROVIDER_UNAVAILABLE",
                retryable=True,
            )
        calls = [_tool_call(c) for _, c in sorted(self.calls.items())]
        # A server that ignores include_usage: estimate the output from the pieces.
        usage = self.usage or Usage(output_tokens=len(self.text) + len(calls))
        return Reply(
            text="".join(self.text),
            tool_calls=calls,
            usage=usage,
            stop_reason=_stop_reason(self.finish, calls),
        )


def _given(value: float | None) -> float | openai.Omit:
    """An agent type's sampling parameter, or not sent at all (the model's default)."""
    return openai.omit if value is None else value


def _tool_choice(choice: ToolChoice | None) -> ChatCompletionToolChoiceOptionParam | openai.Omit:
    if choice is None:
        return openai.omit
    if choice.mode == "tool":
        return ChatCompletionNamedToolChoiceParam(type="function", function={"name": choice.name})
    return choice.mode


def _stop_reason(finish: str, calls: list[ToolCall]) -> Literal["end", "tool_calls", "max_tokens"]:
    if calls:  # whatever the finish reason says (some compatible servers say "stop")
        return "tool_calls"
    return "max_tokens" if finish == "length" else "end"


def _tool_call(raw: dict[str, str]) -> ToolCall:
    return ToolCall(id=raw["id"], name=raw["name"], arguments=parse_arguments(raw["arguments"]))


def _tool(spec: ToolSpec) -> ChatCompletionFunctionToolParam:
    fn = FunctionDefinition(name=spec.name, parameters=spec.parameters)
    if spec.description:
        fn["description"] = spec.description
    return ChatCompletionFunctionToolParam(type="function", function=fn)


def _messages(prompt: Prompt) -> list[ChatCompletionMessageParam]:
    """The system prompt as the first message, then the conversation."""
    out: list[ChatCompletionMessageParam] = []
    if prompt.system:
        out.append(ChatCompletionSystemMessageParam(role="system", content=prompt.system))
    out.extend(
        _message(m) for m in (prompt.messages if prompt.tools else flatten_tool_steps(prompt.messages))
    )
    return out


def _message(m: Message) -> ChatCompletionMessageParam:
    if m.role == "user":
        return ChatCompletionUserMessageParam(role="user", content=m.content)
    if m.role == "tool":  # the API has no error flag: the content says what went wrong
        return ChatCompletionToolMessageParam(role="tool", tool_call_id=m.tool_call_id, content=m.content)
    if not m.tool_calls:
        return ChatCompletionAssistantMessageParam(role="assistant", content=m.content)
    return ChatCompletionAssistantMessageParam(
        role="assistant",
        content=m.content or None,
        tool_calls=[
            ChatCompletionMessageFunctionToolCallParam(
                id=c.id, type="function", function={"name": c.name, "arguments": arguments_text(c)}
            )
            for c in m.tool_calls
        ],
    )


def translate_error(e: Exception) -> ProviderError:
    """The one place SDK and transport errors become :class:`ProviderError`."""
    why = f"openai: {type(e).__name__}: {e}"
    if isinstance(e, openai.RateLimitError):
        return ProviderError(
            why,
            error_code="PROVIDER_RATE_LIMITED",
            retryable=True,
            retry_after_s=retry_after_s(e.response.headers),
        )
    if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
        return ProviderError(why, error_code="PROVIDER_AUTH_FAILED", fatal=True)
    if isinstance(e, openai.APIStatusError):
        return _status_error(why, e.status_code)
    if isinstance(e, openai.APITimeoutError | httpx2.TimeoutException):
        return ProviderError(why, error_code="PROVIDER_TIMEOUT", retryable=True)
    if isinstance(e, openai.APIConnectionError | httpx2.TransportError):
        return ProviderError(why, error_code="PROVIDER_UNAVAILABLE", retryable=True)
    if isinstance(e, openai.APIError):  # an error object inside the stream
        return ProviderError(why, error_code="PROVIDER_UNAVAILABLE", retryable=True)
    return ProviderError(why, error_code="PROVIDER_ERROR")


def _status_error(why: str, status: int) -> ProviderError:
    """5xx may pass, and 408/409 (the SDK's own retry policy); other 4xx will not."""
    if status == 408:
        return ProviderError(why, error_code="PROVIDER_TIMEOUT", retryable=True)
    if status >= 500 or status == 409:
        return ProviderError(why, error_code="PROVIDER_UNAVAILABLE", retryable=True)
    return ProviderError(why, error_code="PROVIDER_BAD_REQUEST")
