"""What every model provider implements.

A provider is built once per replica, warmed before the replica reports ready, and then asked to
:meth:`Provider.generate` for each model call: it calls ``emit(text)`` for every piece of text as
the model streams it and returns a :class:`Reply`: the whole text, the tool calls the model asked
for (offered through ``Prompt.tools``), and the token usage. Messages come in the provider-neutral
:class:`~shared.messages.Message` form (tool calls and tool results included); each provider maps
them to its API's format. It raises
:class:`~shared.errors.ProviderError` (``retryable`` for 429/5xx/timeouts/dropped streams,
``fatal`` for bad credentials) and nothing else; the runtime decides about retries.
"""

from __future__ import annotations

import abc
import email.utils
import os
import time
from collections.abc import Callable, Mapping
from typing import Literal

import msgspec

from agentpool.shared.config import AgentType
from agentpool.shared.config import Provider as ProviderConfig
from agentpool.shared.errors import ProviderError
from agentpool.shared.messages import Message, ToolCall, ToolChoice, Usage
from agentpool.shared.messages import ToolSpec as ToolSpec  # defined with the wire types; at home here too


class Sampling(msgspec.Struct, kw_only=True, frozen=True):
    """A request's own sampling parameters (OpenAI/Anthropic-style calls); None: the agent type's."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None


class Prompt(msgspec.Struct, kw_only=True):
    """What one model call sees: the rendered system prompt, the conversation so far, the tools,
    and the request's own sampling and tool choice (None: the agent type's, the model's default)."""

    system: str
    messages: list[Message]  # history turns, then the new user message (and any tool steps since)
    tools: list[ToolSpec] = []
    tool_choice: ToolChoice | None = None
    sampling: Sampling | None = None

    def max_tokens(self, agent_type: AgentType) -> int:
        given = self.sampling.max_tokens if self.sampling else None
        return given or agent_type.max_tokens

    def temperature(self, agent_type: AgentType) -> float | None:
        given = self.sampling.temperature if self.sampling else None
        return agent_type.temperature if given is None else given

    def top_p(self, agent_type: AgentType) -> float | None:
        given = self.sampling.top_p if self.sampling else None
        return agent_type.top_p if given is None else given


class Reply(msgspec.Struct, kw_only=True):
    """What one model call produced. ``stop_reason``: ``end``, ``tool_calls`` or ``max_tokens``."""

    text: str = ""
    tool_calls: list[ToolCall] = []
    usage: Usage = msgspec.field(default_factory=Usage)
    stop_reason: Literal["end", "tool_calls", "max_tokens"] = "end"


Emit = Callable[[str], None]


def flatten_tool_steps(messages: list[Message]) -> list[Message]:
    """History for a call that offers no tools: each tool exchange folded, as text, into one
    assistant turn with the answer that followed it. The APIs refuse tool blocks when no tools are
    offered (Anthropic always), and a thread may have been answered before by an agent type that
    had tools (an A/B split, a changed pool)."""
    if not any(m.tool_calls or m.role == "tool" for m in messages):
        return messages
    out: list[Message] = []
    for m in messages:
        if m.role == "user":
            out.append(m)
            continue
        if m.role == "tool":
            text = f"[{m.name} {'error' if m.is_error else 'result'}: {m.content}]"
        elif m.tool_calls:
            calls = "; ".join(f"{c.name}({_JSON.encode(c.arguments).decode()})" for c in m.tool_calls)
            text = f"{m.content}\n[called {calls}]" if m.content else f"[called {calls}]"
        else:
            text = m.content
        if out and out[-1].role == "assistant":
            out[-1] = Message("assistant", f"{out[-1].content}\n{text}", out[-1].request_id)
        else:
            out.append(Message("assistant", text, m.request_id))
    return out


_JSON = msgspec.json.Encoder()


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
    async def generate(self, prompt: Prompt, emit: Emit) -> Reply:
        """Stream one completion's text through ``emit``; return the reply (text, tool calls, usage)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close connections."""


def api_key(config: ProviderConfig) -> str:
    """The key from the environment variable the pools file names; fatal if it is unset."""
    if not config.api_key_env:
        raise ProviderError(
            f"{config.kind} provider needs api_key_env in the pools file",
            error_code="PROVIDER_AUTH_FAILED",
            fatal=True,
        )
    key = os.environ.get(config.api_key_env)
    if not key:
        raise ProviderError(
            f"environment variable {config.api_key_env} (the {config.kind} API key) is not set",
            error_code="PROVIDER_AUTH_FAILED",
            fatal=True,
        )
    return key


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), if given."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
