"""Prompt renderers, agents and validators the pool-shape tests name in their pools files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from agentpool.agent import Setup, Turn
from agentpool.shared.config import AgentType
from agentpool.shared.messages import Message, Request
from agentpool.workers.providers.base import Prompt


def by_run(agent_type: AgentType, request: Request, history: list[Message]) -> Prompt:
    """Each run of a fan-out sees its own prompt: the run index and seed in the system prompt."""
    return Prompt(
        system=f"{agent_type.system_prompt} run={request.run} seed={request.seed}",
        messages=[*history, Message("user", request.content)],
    )


class Racer:
    """Run 0 answers at once; every other run streams the (slow) model's answer."""

    def __init__(self, setup: Setup) -> None:
        self.replica_id = setup.replica_id

    async def run(self, turn: Turn) -> AsyncIterator[str]:
        if turn.run == 0:
            yield "first!"
            return
        async for piece in turn.llm.stream(turn.messages(), system=turn.system):
            assert isinstance(piece, str)
            yield piece


class Sleepy:
    """Sleeps the number of seconds the message says, then answers with its replica id."""

    def __init__(self, setup: Setup) -> None:
        self.replica_id = setup.replica_id

    async def run(self, turn: Turn) -> AsyncIterator[str]:
        await asyncio.sleep(float(turn.content))
        yield f"slept on {self.replica_id}"


def not_hard(content: str, request: Request) -> bool | str:
    """The basic level's validator: a question marked hard is beyond it."""
    return "too hard for the basic level" if "hard" in request.content else True
