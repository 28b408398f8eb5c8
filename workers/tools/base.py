"""What every tool source gives the agent runtime: named tools with a schema and an async call.

A :class:`Tool` is offered to the model as its :class:`~workers.providers.base.ToolSpec` and run
with :meth:`Tool.call`, which returns the result text or raises :class:`ToolFailure` with an
``error_code``; the tool loop turns either into a ``tool_result``. A :class:`ToolSource` is
something that must be connected before its tools exist (an MCP server): it is connected once per
replica at warm-up and closed at shutdown (from any task: an MCP session lives in a task of its own).
"""

from __future__ import annotations

import abc
from typing import Any

from agentpool.workers.providers.base import ToolSpec

DEFAULT_TOOL_TIMEOUT_S = 30.0


class ToolFailure(Exception):
    """A tool call that failed in a way the model should hear about (it gets an error result)."""

    def __init__(self, message: str, error_code: str = "TOOL_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code


class Tool(abc.ABC):
    """One callable tool. ``origin`` names where it came from, for error messages
    (``package.module:function``, ``mcp server 'files'``)."""

    spec: ToolSpec
    origin: str
    timeout_s: float | None = None  # None: the agent type's tool_timeout_s

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    async def call(self, arguments: dict[str, Any]) -> str:
        """Run the tool; the result as text (JSON for structured values). Raises ToolFailure."""


class ToolSource(abc.ABC):
    """A connected provider of tools (one MCP server). ``connect`` raises ToolSourceError."""

    name: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and list the tools; raise :class:`ToolSourceError` saying why it cannot."""

    @abc.abstractmethod
    def tools(self) -> list[Tool]:
        """The tools listed at connect (cached; a reconnect refreshes them)."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Close the session and anything it started (a server process); never raises."""


class ToolSourceError(Exception):
    """A tool source could not be connected; ``retryable`` if trying again later may help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
