"""The OpenAI Chat Completions provider, on the official ``openai`` SDK.

Text streams through ``emit`` as the model writes it; usage comes from the last chunk
(``stream_options.include_usage``). SDK retries are off because retrying is the caller's call
(:mod:`workers.providers.retry`), made only while nothing was emitted. The reply length is capped
with ``max_completion_tokens``, which replaced the deprecated ``max_tokens``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import httpx2
import openai
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionUserMessageParam,
)

from shared.config import AgentType
from shared.config import Provider as ProviderConfig
from shared.errors import ProviderError
from shared.messages import Usage
from workers.providers.base import Emit, Message, Prompt, Provider, api_key, retry_after_s

log = logging.getLogger(__name__)

WARM_TIMEOUT_S = 5.0
SDK_ERRORS = (openai.OpenAIError, httpx2.HTTPError)  # httpx2: failures while reading a stream


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
    ) -> Usage:
        """Stream one reply; ``extra_headers`` go on the HTTP request (e.g. fake-server knobs)."""
        try:
            return await self._stream(prompt, emit, extra_headers)
        except SDK_ERRORS as e:
            raise translate_error(e) from e

    async def _stream(self, prompt: Prompt, emit: Emit, extra_headers: Mapping[str, str] | None) -> Usage:
        stream = await self._sdk().chat.completions.create(
            model=self.model,
            messages=_messages(prompt),
            temperature=self.agent_type.temperature,
            top_p=self.agent_type.top_p,
            max_completion_tokens=self.agent_type.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=dict(extra_headers or {}),
        )
        finished, deltas, usage = False, 0, None
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = Usage(
                        input_tokens=chunk.usage.prompt_tokens, output_tokens=chunk.usage.completion_tokens
                    )
                for choice in chunk.choices:
                    if choice.delta.content:
                        deltas += 1
                        emit(choice.delta.content)
                    finished = finished or choice.finish_reason is not None
        if not finished:
            raise ProviderError(
                "openai stream ended without a finish_reason",
                error_code="PROVIDER_UNAVAILABLE",
                retryable=True,
            )
        return usage or Usage(output_tokens=deltas)  # a server that ignores include_usage: estimate

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()
            self._client = None


def _messages(prompt: Prompt) -> list[ChatCompletionMessageParam]:
    """The system prompt as the first message, then the conversation."""
    out: list[ChatCompletionMessageParam] = []
    if prompt.system:
        out.append(ChatCompletionSystemMessageParam(role="system", content=prompt.system))
    out.extend(_message(m) for m in prompt.messages)
    return out


def _message(m: Message) -> ChatCompletionMessageParam:
    if m.role == "user":
        return ChatCompletionUserMessageParam(role="user", content=m.content)
    return ChatCompletionAssistantMessageParam(role="assistant", content=m.content)


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
