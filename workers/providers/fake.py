"""The built-in fake model as a provider: :mod:`agentpool.shared.fake_model`'s answers, with shaped timing.

Text streams token by token after ``ttft_ms``, at ``tokens_per_s``; tool calls (asked for with
``@name {json}`` markers, see :mod:`agentpool.shared.fake_model`) come back after ``ttft_ms`` with no text.
The fake LLM server (``agentpool fake-llm``) answers with the same model.
"""

from __future__ import annotations

import asyncio
import os

from agentpool.shared.fake_model import WORDS, count_tokens, fake_tokens, input_tokens, respond
from agentpool.shared.messages import Usage
from agentpool.workers.providers.base import Emit, Prompt, Provider, Reply

__all__ = ["WORDS", "FakeProvider", "count_tokens", "fake_tokens"]


class FakeProvider(Provider):
    kind = "fake"

    async def generate(self, prompt: Prompt, emit: Emit) -> Reply:
        cfg = self.config
        if cfg.crash_marker and prompt.messages and cfg.crash_marker in prompt.messages[-1].content:
            os._exit(70)  # chaos testing: die like a segfault would, with the message unacked
        answer = respond(
            prompt.system,
            prompt.messages,
            _offered(prompt),
            cfg.reply_tokens,
            prompt.max_tokens(self.agent_type),
        )
        if cfg.ttft_ms:
            await asyncio.sleep(cfg.ttft_ms / 1000)
        usage = Usage(
            input_tokens=input_tokens(prompt.system, prompt.messages), output_tokens=answer.output_tokens
        )
        if answer.tool_calls:
            return Reply(tool_calls=answer.tool_calls, usage=usage, stop_reason="tool_calls")
        await self._stream(answer.tokens, emit)
        return Reply(text=answer.text, usage=usage, stop_reason="max_tokens" if answer.truncated else "end")

    async def _stream(self, tokens: list[str], emit: Emit) -> None:
        gap = 1.0 / self.config.tokens_per_s if self.config.tokens_per_s else 0.0
        for i, tok in enumerate(tokens):
            if gap and i:
                await asyncio.sleep(gap)
            emit(tok)


def _offered(prompt: Prompt) -> set[str]:
    """The tools the fake model may call: ``tool_choice`` none offers none, a named one only it."""
    names = {t.name for t in prompt.tools}
    choice = prompt.tool_choice
    if choice is None:
        return names
    if choice.mode == "none":
        return set()
    return names & {choice.name} if choice.mode == "tool" else names
