"""``kind = "python"``: the user's agent, made once per replica by ``factory(setup)``.

A sync factory runs in a thread, so the replica keeps heartbeating (as ``starting``) through a
build that takes seconds; an async one is awaited. Whatever it returns must have ``run(turn)``,
an async iterator of text and step events; an ``aclose()`` is called at shutdown if it has one.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from agentpool.shared.errors import ConfigError, ProviderError
from agentpool.shared.messages import Step, ToolCall, ToolResult
from agentpool.workers.agents.api import Turn
from agentpool.workers.agents.base import Runner
from agentpool.workers.agents.loop import AgentFailed, Sink
from agentpool.workers.imports import import_object


class FactoryFailed(Exception):
    """The factory raised, or returned something that is not an agent; the replica is unhealthy."""


class PythonRunner(Runner):
    kind = "python"
    agent: Any = None

    async def build(self) -> None:
        path = self.ctx.setup.agent_type.factory or ""
        factory = import_object(path, "factory")
        if not callable(factory):
            raise ConfigError(f"factory {path!r} is not callable")
        try:
            if inspect.iscoroutinefunction(factory):
                agent = await factory(self.ctx.setup)
            else:
                agent = await asyncio.to_thread(factory, self.ctx.setup)
                if inspect.isawaitable(agent):
                    agent = await agent
        except Exception as e:
            raise FactoryFailed(f"factory {path!r} raised {type(e).__name__}: {e}") from e
        if not callable(getattr(agent, "run", None)):
            raise FactoryFailed(f"factory {path!r} returned {type(agent).__name__}, which has no run(turn)")
        self.agent = agent

    async def run(self, turn: Turn, sink: Sink) -> None:
        items = self.agent.run(turn)
        if not hasattr(items, "__aiter__"):
            raise AgentFailed(
                f"{type(self.agent).__name__}.run(turn) must be an async iterator (async def + yield)"
            )
        try:
            async for item in items:
                if isinstance(item, str):
                    sink.text(item)
                elif isinstance(item, ToolCall | ToolResult | Step):
                    sink.event(item)
                else:
                    kind = type(item).__name__
                    raise AgentFailed(
                        f"the agent yielded a {kind}; expected str, ToolCall, ToolResult or Step"
                    )
        except (AgentFailed, ProviderError):
            raise  # a model call's failure keeps its PROVIDER_* code
        except Exception as e:
            raise AgentFailed(f"the agent raised {type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        close = getattr(self.agent, "aclose", None)
        if close is not None:
            await close()
