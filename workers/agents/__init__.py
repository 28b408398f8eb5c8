"""The agent a replica runs, one kind per module: ``chat`` (the built-in loop) and ``python``.

:func:`open_agent` is the replica's warm-up: connect the tools, then build the agent (for
``python``, call the user's factory). Whatever fails here leaves the replica ``unhealthy`` with the
reason; it never takes work half-built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentpool.shared.config import AgentType
from agentpool.shared.messages import ToolResult
from agentpool.workers.agents.api import Setup
from agentpool.workers.agents.base import Context, Runner
from agentpool.workers.agents.chat import ChatRunner
from agentpool.workers.agents.llm import LLM
from agentpool.workers.agents.loop import ToolBox
from agentpool.workers.agents.python import PythonRunner
from agentpool.workers.tools import ToolSet, open_tools

_KINDS: dict[str, type[Runner]] = {"chat": ChatRunner, "python": PythonRunner}


@dataclass
class OpenedAgent:
    runner: Runner
    tools: ToolSet

    async def aclose(self) -> None:
        try:
            await self.runner.aclose()
        finally:
            await self.tools.aclose()


async def open_agent(
    name: str,
    agent_type: AgentType,
    *,
    replica_id: str,
    pool: str,
    deployment: str,
    llm: LLM,
    on_tool_result: Callable[[ToolResult], None] | None = None,
) -> OpenedAgent:
    """Tools connected, agent built. Raises ConfigError, ToolSourceError or FactoryFailed."""
    tools = await open_tools(agent_type)
    try:
        setup = Setup(
            agent_type_name=name,
            agent_type=agent_type,
            replica_id=replica_id,
            pool=pool,
            deployment=deployment,
            llm=llm,
            tools=list(tools.tools),
            options=dict(agent_type.options),
        )
        box = ToolBox(
            tools.tools,
            timeout_s=agent_type.tool_timeout_s,
            approval=agent_type.approval_required,
            on_result=on_tool_result,
        )
        runner = _KINDS[agent_type.kind](Context(setup, box, agent_type.max_tool_rounds))
        await runner.build()
    except BaseException:
        await tools.aclose()
        raise
    return OpenedAgent(runner, tools)


__all__ = ["LLM", "OpenedAgent", "Runner", "open_agent"]
