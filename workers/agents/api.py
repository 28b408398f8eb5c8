"""What user agent code is handed: :class:`Setup` once per replica, a :class:`Turn` per request.

Re-exported, with the step types, by :mod:`agentpool.agent`, the one module user code imports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from agentpool.shared.config import AgentType
from agentpool.shared.messages import Message, StepEvent, ToolCall, ToolChoice, ToolResult
from agentpool.workers.agents.llm import LLM
from agentpool.workers.agents.loop import ToolBox, tool_loop
from agentpool.workers.tools.base import Tool

Item = str | StepEvent  # what a run yields: text, or a ToolCall / ToolResult / Step event


@runtime_checkable
class Agent(Protocol):
    """What a ``kind = "python"`` factory returns: ``run(turn)`` yields text and step events."""

    def run(self, turn: Turn) -> AsyncIterator[Item]: ...


@dataclass
class Setup:
    """Handed to the factory once per replica, during warm-up (before the replica takes work).

    ``llm`` is the agent type's model client; ``tools`` are the agent type's function and MCP tools,
    connected; ``options`` is the agent type's free-form ``options`` table of the pools file."""

    agent_type_name: str
    agent_type: AgentType
    replica_id: str
    pool: str
    deployment: str
    llm: LLM
    tools: list[Tool]
    options: dict[str, Any]


@dataclass
class Turn:
    """One request, as the agent sees it.

    ``history`` is the thread's earlier messages (tool steps included, oldest first); ``system`` the
    agent type's system prompt with ``context_variables`` filled in; ``deadline`` the unix time by
    which the run must end (``run_timeout_s``; past it the run is cancelled); ``llm`` counts the
    tokens of this request's model calls into ``end.usage``."""

    request_id: str
    content: str
    thread_id: str
    tenant: str
    history: list[Message]
    context_variables: dict[str, str]
    deadline: float
    llm: LLM
    system: str = ""
    tools: list[Tool] = field(default_factory=list)
    attempt: int = 1
    run: int = 0  # a best-of-N fan-out's run index (0-based), of ``runs``; 0 and 0 otherwise
    runs: int = 0
    seed: int = 0  # the run's seed: vary the prompt with it (differs per run of a fan-out)
    _toolbox: ToolBox | None = field(default=None, repr=False)
    _max_rounds: int = 8
    _opening: list[Message] | None = field(default=None, repr=False)  # a prompt_renderer's, a Chat's
    _tool_choice: ToolChoice | None = field(default=None, repr=False)  # a Chat's

    def messages(self) -> list[Message]:
        """History, then this request's user message: what a model call for this turn starts from
        (as the agent type's ``prompt_renderer`` shaped it, if it has one)."""
        if self._opening is not None:
            return list(self._opening)
        return [*self.history, Message("user", self.content, self.request_id)]

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.time())

    async def loop(
        self,
        *,
        system: str | None = None,
        messages: Sequence[Message] | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> AsyncIterator[Item]:
        """The built-in tool loop (what ``kind = "chat"`` runs), as items to yield on: model text,
        then each round's tool calls and results, until the model answers without a tool call.

        Defaults: this turn's system prompt, :meth:`messages` and tools."""
        box = self._toolbox or ToolBox([], timeout_s=30.0)
        if tools is not None:
            box = box.subset(tools)
        queue: asyncio.Queue[Item | None] = asyncio.Queue()
        sink = _QueueSink(queue)
        conversation = list(messages) if messages is not None else self.messages()

        async def produce() -> None:
            try:
                await tool_loop(
                    self.llm,
                    box,
                    sink,
                    system=self.system if system is None else system,
                    messages=conversation,
                    max_rounds=self._max_rounds,
                    tool_choice=self._tool_choice,
                )
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(produce())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await task  # re-raise what ended the loop (TOOL_ROUNDS_EXCEEDED, a provider error)
        finally:
            if not task.done():
                task.cancel()


class _QueueSink:
    def __init__(self, queue: asyncio.Queue[Item | None]) -> None:
        self.queue = queue

    def text(self, text: str) -> None:
        self.queue.put_nowait(text)

    def event(self, event: StepEvent) -> None:
        self.queue.put_nowait(event)


__all__ = ["Agent", "Item", "Setup", "ToolCall", "ToolResult", "Turn"]
