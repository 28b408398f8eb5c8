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
            turn._toolbox or self.ctx.toolbox,  # with the request's own tools, if it brought any
            sink,
            system=turn.system,
            messages=turn.messages(),
            max_rounds=self.ctx.max_rounds,
            tool_choice=turn._tool_choice,
        )

    async def resume(self, turn: Turn, sink: Sink, state: LoopState, decision: Decision) -> None:
        await resume_loop(
            turn.llm,
            turn._toolbox or self.ctx.toolbox,
            sink,
            system=turn.system,
            state=state,
            decision=decision,
            max_rounds=self.ctx.max_rounds,
        )
