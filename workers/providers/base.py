"""What every model provider implements.

A provider is built once per replica, warmed before the replica reports ready, and then asked to
:meth:`Provider.generate` for each request: it calls ``emit(text)`` for every piece of text as the
model streams it and returns the token :class:`~shared.messages.Usage`. It raises
:class:`~shared.errors.ProviderError` (``retryable`` for 429/5xx/timeouts/dropped streams,
``fatal`` for bad credentials) and nothing else; the runtime decides about retries.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Literal

import msgspec

from shared.config import AgentType
from shared.config import Provider as ProviderConfig
from shared.messages import Usage


class Message(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str


class Prompt(msgspec.Struct, kw_only=True):
    """What one model call sees: the rendered system prompt and the conversation so far."""

    system: str
    messages: list[Message]  # history turns, then the new user message last


Emit = Callable[[str], None]


class Provider(abc.ABC):
    kind: str = ""

    def __init__(self, config: ProviderConfig, agent_type: AgentType) -> None:
        self.config = config
        self.agent_type = agent_type

    @property
    def model(self) -> str:
        return self.agent_type.model

    async def warm(self) -> None:  # noqa: B027 - optional hook
        """Open connections, check credentials; raise ProviderError if unusable."""

    @abc.abstractmethod
    async def generate(self, prompt: Prompt, emit: Emit) -> Usage:
        """Stream one completion through ``emit``; return token usage."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close connections."""
