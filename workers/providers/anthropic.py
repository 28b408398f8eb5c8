"""The Anthropic Messages API provider, on the official ``anthropic`` SDK (2.x).

Text streams through ``emit`` as the model writes it; usage and the tool calls (``tool_use``
blocks, their input put together by the SDK) come from the final message. In the history an
assistant message's tool calls follow its text as ``tool_use`` blocks, and consecutive tool results
go back as one user message of ``tool_result`` blocks, as the API wants them. SDK
retries are off because retrying is the caller's call (:mod:`agentpool.workers.providers.retry`), made only
while nothing was emitted. SDK 2.x speaks API version 2026-10-21, which refuses sampling
parameters, so an agent type on this provider that sets ``temperature`` or ``top_p`` is refused
when the pools file loads (``agentpool.shared.config.SAMPLING``), never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from itertools import groupby
from typing import Literal

import anthropic
import httpx2
from anthropic.types import (
    AssistantMessageParam,
    MessageParam,
    TextBlockParam,
    ToolChoiceAnyParam,
    ToolChoiceAutoParam,
    ToolChoiceNoneParam,
    ToolChoiceParam,
    ToolChoiceToolParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
    UserMessageParam,
)
from anthropic.types import Message as SdkMessage

from agentpool.shared.config import AgentType
from agentpool.shared.config import Provider as ProviderConfig
from agentpool.shared.errors import ProviderError
from agentpool.shared.messages import Message, ToolCall, ToolChoice, Usage
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
SDK_ERRORS = (anthropic.AnthropicError, httpx2.HTTPError)  # httpx2: failures while reading a stream


class AnthropicProvider(Provider):
    kind = "anthropic"

    def __init__(self, config: ProviderConfig, agent_type: AgentType) -> None:
        super().__init__(config, agent_type)
        self._client: anthropic.AsyncAnthropic | None = None
        self._closed = False

    def _sdk(self) -> anthropic.AsyncAnthropic:
        """The SDK client, made on first use so a missing key surfaces as a ProviderError."""
        if self._closed:
            raise ProviderError("the anthropic provider is closed", error_code="PROVIDER_CLOSED")
        if self._client is None:
            self._client = anthropic.AsyncAnthropic(
                base_url=self.config.base_url,
                api_key=api_key(self.config),
                timeout=self.agent_type.timeout_s,
                max_retries=0,
            )
        return self._client

    async def warm(self) -> None:
        """Open the connection pool and check the key with a cheap ``GET /v1/models``."""
        try:
            await self._sdk().models.list(limit=1, timeout=WARM_TIMEOUT_S)
        except anthropic.NotFoundError:
            log.warning("%s has no /v1/models; the key is checked on the first request", self.config.base_url)
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
        manager = self._sdk().messages.stream(
            model=self.model,
            system=prompt.system or anthropic.omit,
            messages=list(
                _messages(prompt.messages if prompt.tools else flatten_tool_steps(prompt.messages))
            ),
            tools=[_tool(t) for t in prompt.tools] or anthropic.omit,
            tool_choice=_tool_choice(prompt.tool_choice) if prompt.tools else anthropic.omit,
            max_tokens=prompt.max_tokens(self.agent_type),
            extra_headers=dict(extra_headers or {}),
        )
        final: SdkMessage | None = None
        text: list[str] = []
        async with manager as stream:
            async for event in stream:  # read to the end, so the connection goes back to the pool
                if event.type == "text":
                    text.append(event.text)
                    emit(event.text)
                elif event.type == "message_stop":
                    final = event.message
        if final is None:
            raise ProviderError(
                "anthropic stream ended before message_stop",
                error_code="PROVIDER_UNAVAILABLE",
                retryable=True,
            )
        return _reply("".join(text), final)

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()
            self._client = None


def _tool_choice(choice: ToolChoice | None) -> ToolChoiceParam | anthropic.Omit:
    if choice is None:
        return anthropic.omit
    if choice.mode == "none":
        return ToolChoiceNoneParam(type="none")
    if choice.mode == "required":
        return ToolChoiceAnyParam(type="any")
    if choice.mode == "tool":
        return ToolChoiceToolParam(type="tool", name=choice.name)
    return ToolChoiceAutoParam(type="auto")


def _reply(text: str, final: SdkMessage) -> Reply:
    calls = [
        ToolCall(id=b.id, name=b.name, arguments=dict(b.input)) for b in final.content if b.type == "tool_use"
    ]
    usage = Usage(input_tokens=final.usage.input_tokens, output_tokens=final.usage.output_tokens)
    return Reply(text=text, tool_calls=calls, usage=usage, stop_reason=_stop_reason(final.stop_reason, calls))


def _stop_reason(stop: str | None, calls: list[ToolCall]) -> Literal["end", "tool_calls", "max_tokens"]:
    if calls:
        return "tool_calls"
    return "max_tokens" if stop == "max_tokens" else "end"


def _tool(spec: ToolSpec) -> ToolParam:
    tool = ToolParam(name=spec.name, input_schema=spec.parameters)
    if spec.description:
        tool["description"] = spec.description
    return tool


def _messages(messages: Sequence[Message]) -> Iterator[MessageParam]:
    """The conversation in the API's form: each run of tool results becomes one user message."""
    for is_result, run in groupby(messages, key=lambda m: m.role == "tool"):
        if is_result:
            yield UserMessageParam(role="user", content=[_result(m) for m in run])
        else:
            yield from (_message(m) for m in run)


def _message(m: Message) -> MessageParam:
    if m.role == "user":
        return UserMessageParam(role="user", content=m.content)
    if not m.tool_calls:
        return AssistantMessageParam(role="assistant", content=m.content)
    text = [TextBlockParam(type="text", text=m.content)] if m.content else []
    uses = [ToolUseBlockParam(type="tool_use", id=c.id, name=c.name, input=c.arguments) for c in m.tool_calls]
    return AssistantMessageParam(role="assistant", content=[*text, *uses])


def _result(m: Message) -> ToolResultBlockParam:
    block = ToolResultBlockParam(type="tool_result", tool_use_id=m.tool_call_id, content=m.content)
    if m.is_error:
        block["is_error"] = True
    return block


def translate_error(e: Exception) -> ProviderError:
    """The one place SDK and transport errors become :class:`ProviderError`."""
    why = f"anthropic: {type(e).__name__}: {e}"
    if isinstance(e, anthropic.RateLimitError):
        return ProviderError(
            why,
            error_code="PROVIDER_RATE_LIMITED",
            retryable=True,
            retry_after_s=retry_after_s(e.response.headers),
        )
    if isinstance(e, anthropic.AuthenticationError | anthropic.PermissionDeniedError):
        return ProviderError(why, error_code="PROVIDER_AUTH_FAILED", fatal=True)
    if isinstance(e, anthropic.APIStatusError):
        return _status_error(why, e.status_code)
    if isinstance(e, anthropic.APITimeoutError | httpx2.TimeoutException):
        return ProviderError(why, error_code="PROVIDER_TIMEOUT", retryable=True)
    if isinstance(e, anthropic.APIConnectionError | httpx2.TransportError):
        return ProviderError(why, error_code="PROVIDER_UNAVAILABLE", retryable=True)
    return ProviderError(why, error_code="PROVIDER_ERROR")


def _status_error(why: str, status: int) -> ProviderError:
    """5xx, and an ``error`` event inside a 200 stream, may pass; 408/409 too; other 4xx will not."""
    if status == 408:
        return ProviderError(why, error_code="PROVIDER_TIMEOUT", retryable=True)
    if status >= 500 or status < 400 or status == 409:
        return ProviderError(why, error_code="PROVIDER_UNAVAILABLE", retryable=True)
    return ProviderError(why, error_code="PROVIDER_BAD_REQUEST")
