"""``kind = "chat"``: the built-in loop, one model with the agent type's tools."""

from __future__ import annotations

from agentpool.workers.agents.api import Turn
from agentpool.workers.agents.base import Runner
from agentpool.workers.agents.loop import Decision, LoopState, Sink, resume_loop, tool_loop


class ChatRunner(Runner):
    kind = "chat"

    async def run(self, turn: Turn, sink: Sink) -> None:
        await tool_loop(
            turn.llm,
            self.ctx.toolbox,
            sink,
            system=turn.system,
            messages=turn.messages(),
            max_rounds=self.ctx.max_rounds,
        )

    async def resume(self, turn: Turn, sink: Sink, state: LoopState, decision: Decision) -> None:
        await resume_loop(
            turn.llm,
            self.ctx.toolbox,
            sink,
            system=turn.system,
            state=state,
            decision=decision,
            max_rounds=self.ctx.max_rounds,
        )
