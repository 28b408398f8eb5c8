"""Retrying provider calls: only retryable errors, only before any text reached the client.

Once a chunk was emitted the client has seen part of an answer; a second attempt would repeat or
contradict it, so a failure then is raised as is and the caller ends the reply with an error event.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from agentpool.shared.errors import ProviderError
from agentpool.workers.providers.base import Emit, Prompt, Provider, Reply

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
RETRY_AFTER_MAX_S = 30.0  # a provider asking for a longer pause gets the error, not a parked replica


def backoff_s(attempt: int, retry_after_s: float | None = None) -> float:
    """Full-jitter exponential delay before retry ``attempt`` (1-based), at least ``retry_after_s``."""
    delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
    return max(delay, retry_after_s or 0.0)


def _give_up(e: ProviderError, emitted: bool, attempt: int, retries: int) -> bool:
    if emitted or e.fatal or not e.retryable or attempt >= retries:
        return True
    return e.retry_after_s is not None and e.retry_after_s > RETRY_AFTER_MAX_S


async def generate_with_retries(
    provider: Provider,
    prompt: Prompt,
    emit: Emit,
    *,
    retries: int,
    on_retry: Callable[[ProviderError, int], None] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> Reply:
    """``provider.generate`` with up to ``retries`` more attempts while nothing was emitted."""
    emitted = False

    def tracking_emit(text: str) -> None:
        nonlocal emitted
        emitted = True
        emit(text)

    attempt = 0
    while True:
        try:
            return await provider.generate(prompt, tracking_emit)
        except ProviderError as e:
            if _give_up(e, emitted, attempt, retries):
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(e, attempt)
            await sleep(backoff_s(attempt, e.retry_after_s))
