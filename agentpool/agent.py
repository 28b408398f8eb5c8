"""The contract between agentpool and your agent code: the one module user code imports.

A pools file names your factory (``kind = "python"``, ``factory = "mypkg.agent:build"``) and your
tools (``tools = ["mypkg.tools:lookup"]``)::

    from agentpool.agent import Setup, Step, Turn, tool

    @tool(timeout_s=5)
    def lookup(order_id: str) -> dict:
        \"\"\"Find an order.

        Args:
            order_id: the id printed on the receipt
        \"\"\"
        return {"id": order_id, "status": "shipped"}

    class Agent:
        def __init__(self, setup: Setup) -> None:  # once per replica, at warm-up
            self.llm = setup.llm

        async def run(self, turn: Turn):  # once per request
            yield Step(name="plan", data={"steps": 1})
            async for item in turn.loop():  # the built-in model + tools loop
                yield item

    def build(setup: Setup) -> Agent:  # may be async, may take seconds
        return Agent(setup)

What ``run`` yields is streamed to the client: a ``str`` as ``chunk`` events, a
:class:`ToolCall`, :class:`ToolResult` or :class:`Step` as an event of its own; the thread keeps the
text and the tool steps for the next turn. ``turn.llm`` calls the agent type's model with the pool's
retries; every call it makes is summed into the request's ``end.usage``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from agentpool.shared.messages import Message, Step, ToolCall, ToolResult, Usage
from agentpool.workers.agents.api import Agent, Item, Setup, Turn
from agentpool.workers.agents.llm import LLM
from agentpool.workers.providers.base import Reply, ToolSpec
from agentpool.workers.tools.base import Tool, ToolFailure
from agentpool.workers.tools.functions import TOOL_ATTR

F = TypeVar("F", bound=Callable[..., Any])


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(*, name: str | None = None, timeout_s: float | None = None) -> Callable[[F], F]: ...
def tool(
    fn: F | None = None, /, *, name: str | None = None, timeout_s: float | None = None
) -> F | Callable[[F], F]:
    """Mark a function as a tool with its own ``name`` or ``timeout_s`` (else: the function's
    name and the agent type's ``tool_timeout_s``). Its schema comes from its signature, type
    hints and docstring (``Args:`` entries describe the parameters). Unmarked functions are tools
    as well when the pools file lists them."""

    def mark(f: F) -> F:
        setattr(f, TOOL_ATTR, {"name": name, "timeout_s": timeout_s})
        return f

    return mark(fn) if fn is not None else mark


__all__ = [
    "LLM",
    "Agent",
    "Item",
    "Message",
    "Reply",
    "Setup",
    "Step",
    "Tool",
    "ToolCall",
    "ToolFailure",
    "ToolResult",
    "ToolSpec",
    "Turn",
    "Usage",
    "tool",
]
