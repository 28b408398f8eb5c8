"""What every agent kind implements for the runtime; one kind per module (chat, python)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from agentpool.workers.agents.api import Setup, Turn
from agentpool.workers.agents.loop import AgentFailed, Decision, LoopState, Sink, ToolBox


@dataclass
class Context:
    """What a replica built for its agent: the user-facing setup plus the runtime's own pieces."""

    setup: Setup
    toolbox: ToolBox
    max_rounds: int


class Runner(abc.ABC):
    """Built once per replica (:meth:`build` may take seconds); runs one :class:`Turn` per request,
    sending its text and steps to the sink, in order."""

    kind = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def build(self) -> None:  # noqa: B027 - optional hook
        """Warm-up work before the replica reports ready."""

    @abc.abstractmethod
    async def run(self, turn: Turn, sink: Sink) -> None:
        """Run the turn to its end; raise AgentFailed (or a ProviderError) to end it with an error."""

    async def resume(self, turn: Turn, sink: Sink, state: LoopState, decision: Decision) -> None:
        raise AgentFailed(f"a {self.kind} agent cannot resume a paused run", error_code="NOT_RESUMABLE")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what build made."""
