"""Tool sources, one module each: Python functions (:mod:`.functions`) and MCP servers (:mod:`.mcp`).

:func:`open_tools` gives a replica every tool of its agent type, connected, with one name each;
the MCP module is imported only by agent types that have MCP servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agentpool.shared.config import AgentType
from agentpool.shared.errors import ConfigError
from agentpool.workers.tools.base import Tool, ToolSource, ToolSourceError
from agentpool.workers.tools.functions import load_function_tool


@dataclass
class ToolSet:
    tools: list[Tool] = field(default_factory=list)
    sources: list[ToolSource] = field(default_factory=list)

    async def aclose(self) -> None:
        for source in self.sources:
            await source.cleanup()


async def open_tools(agent_type: AgentType) -> ToolSet:
    """Load the function tools, connect the MCP servers; ConfigError/ToolSourceError say what failed."""
    out = ToolSet([load_function_tool(path) for path in agent_type.tools])
    try:
        if agent_type.mcp_servers:
            from agentpool.workers.tools.mcp import build_mcp_source

            for server in agent_type.mcp_servers:
                source = build_mcp_source(server)
                out.sources.append(source)
                await source.connect()
                out.tools.extend(source.tools())
        check_names(out.tools)
        check_approval(agent_type.approval_required, out.tools)
    except BaseException:
        await out.aclose()
        raise
    return out


def check_names(tools: Sequence[Tool]) -> None:
    """Each tool name once: a clash names both origins."""
    seen: dict[str, Tool] = {}
    for tool in tools:
        if (other := seen.get(tool.name)) is not None:
            raise ConfigError(
                f"tool name {tool.name!r} is offered twice: by {other.origin} and by {tool.origin}"
                " (give an MCP server a prefix)"
            )
        seen[tool.name] = tool


def check_approval(names: Sequence[str], tools: Sequence[Tool]) -> None:
    offered = {t.name for t in tools}
    unknown = [n for n in names if n not in offered]
    if unknown:
        raise ConfigError(
            f"approval_required names {unknown}, which no tool offers (offered: {sorted(offered)})"
        )


__all__ = ["Tool", "ToolSet", "ToolSource", "ToolSourceError", "open_tools"]
