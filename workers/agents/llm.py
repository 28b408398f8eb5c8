"""The ``llm`` client an agent calls: the agent type's provider and model, with retries and usage.

One :class:`LLM` is made per replica (``Setup.llm``); each request gets its own view
(:meth:`LLM.for_request`) sharing the provider's connections, so ``end.usage`` sums exactly the
calls that request made, however many, while other requests run on the same replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from agentpool.shared.errors import ProviderError
from agentpool.shared.messages import Message, ToolCall, ToolChoice, Usage
from agentpool.workers.providers.base import Emit, Prompt, Provider, Reply, Sampling, ToolSpec
from agentpool.workers.providers.retry import generate_with_retries
from agentpool.workers.tools.base import Tool

OnRetry = Callable[[ProviderError, int], None]
_DONE = object()


class LLM:
    """Calls the model of the agent type. ``usage`` is the sum over every call made through it."""

    def __init__(
        self,
        provider: Provider,
        retries: int,
        on_retry: OnRetry | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        self._provider = provider
        self._retries = retries
        self._on_retry = on_retry
        self._sampling = sampling
        self.usage = Usage()
        self.calls = 0
        self.stop_reason = "end"  # the last call's

    @property
    def model(self) -> str:
        return self._provider.model

    def for_request(self, sampling: Sampling | None = None) -> LLM:
        """A view with its own usage count (and the request's own sampling parameters, if it
        brought any), on the same provider and connections."""
        return LLM(self._provider, self._retries, self._on_retry, sampling)

    async def complete(
        self,
        messages: Sequence[Message] | str,
        *,
        system: str = "",
        tools: Sequence[Tool | ToolSpec] = (),
        on_text: Emit | None = None,
        tool_choice: ToolChoice | None = None,
    ) -> Reply:
        """One model call; text streams to ``on_text`` as it comes. Retries a retryable failure
        only while no text was streamed (a retry would repeat it)."""
        if isinstance(messages, str):
            messages = [Message("user", messages)]
        specs = [t.spec if isinstance(t, Tool) else t for t in tools]
        prompt = Prompt(
            system=system,
            messages=list(messages),
            tools=specs,
            tool_choice=tool_choice,
            sampling=self._sampling,
        )
        self.calls += 1
        reply = await generate_with_retries(
            self._provider, prompt, on_text or _ignore, retries=self._retries, on_retry=self._on_retry
        )
        self.usage.input_tokens += reply.usage.input_tokens
        self.usage.output_tokens += reply.usage.output_tokens
        self.stop_reason = reply.stop_reason
        return reply

    async def stream(
        self,
        messages: Sequence[Message] | str,
        *,
        system: str = "",
        tools: Sequence[Tool | ToolSpec] = (),
    ) -> AsyncIterator[str | ToolCall]:
        """The same call as :meth:`complete`, as items: text pieces while the model writes, then
        the tool calls it asked for."""
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def produce() -> Reply:
            try:
                return await self.complete(messages, system=system, tools=tools, on_text=queue.put_nowait)
            finally:
                queue.put_nowait(_DONE)

        task = asyncio.create_task(produce())
        try:
            while (item := await queue.get()) is not _DONE:
                assert isinstance(item, str)
                yield item
            for call in (await task).tool_calls:
                yield call
        finally:
            if not task.done():
                task.cancel()


def _ignore(_text: str) -> None:
    pass
