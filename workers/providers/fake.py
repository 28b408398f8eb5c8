"""The built-in fake model: deterministic text derived from the prompt, with shaped timing.

The reply names how many earlier messages it saw, so a test can tell that history reached the
model; the rest of the text is chosen by a hash of the prompt, so equal prompts get equal replies.
The fake LLM server (``agentpool fake-llm``) uses the same generator.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from shared.messages import Usage
from workers.providers.base import Emit, Message, Prompt, Provider

WORDS = [
    "agent",
    "pool",
    "warm",
    "stream",
    "token",
    "reply",
    "queue",
    "thread",
    "sticky",
    "replica",
    "broker",
    "redis",
    "rabbit",
    "answer",
    "helpful",
    "quick",
    "steady",
    "calm",
    "bright",
    "clear",
    "ready",
    "fast",
    "kind",
]


def fake_tokens(system: str, messages: list[Message], n_tokens: int) -> list[str]:
    """The deterministic reply to a prompt, as tokens (each ending in a space but the last)."""
    last = messages[-1].content if messages else ""
    earlier = len(messages) - 1
    seed = hashlib.blake2b(
        (system + "\x1f" + "\x1e".join(m.role + ":" + m.content for m in messages)).encode(),
        digest_size=32,
    ).digest()
    head = f"[{earlier} earlier] Re: {' '.join(last.split()[:4])[:40]} —".split()
    words = [WORDS[seed[i % len(seed)] % len(WORDS)] for i in range(max(0, n_tokens - len(head)))]
    toks = head + words
    return [t + " " for t in toks[:-1]] + [toks[-1]]


def count_tokens(text: str) -> int:
    """A rough, deterministic token count (whitespace words) for usage accounting."""
    return len(text.split())


class FakeProvider(Provider):
    kind = "fake"

    async def generate(self, prompt: Prompt, emit: Emit) -> Usage:
        cfg = self.config
        if cfg.crash_marker and prompt.messages and cfg.crash_marker in prompt.messages[-1].content:
            os._exit(70)  # chaos testing: die like a segfault would, with the message unacked
        n = min(cfg.reply_tokens, self.agent_type.max_tokens)
        tokens = fake_tokens(prompt.system, prompt.messages, n)
        if cfg.ttft_ms:
            await asyncio.sleep(cfg.ttft_ms / 1000)
        gap = 1.0 / cfg.tokens_per_s if cfg.tokens_per_s else 0.0
        for i, tok in enumerate(tokens):
            if gap and i:
                await asyncio.sleep(gap)
            emit(tok)
        used_in = count_tokens(prompt.system) + sum(count_tokens(m.content) for m in prompt.messages)
        return Usage(input_tokens=used_in, output_tokens=len(tokens))
