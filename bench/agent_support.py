"""Tools and a factory for bench/agents.py (named in its pools file as ``bench.agent_support:...``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from agentpool.agent import Setup, Turn


def noop() -> str:
    """Does nothing: what a tool round costs without the tool's own work."""
    return "ok"


def chain(n: int) -> str:
    """Asks the fake model for ``n - 1`` more rounds of itself, then says done."""
    return f'@chain {{"n": {n - 1}}}' if n > 1 else "done"


class Answer:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    async def run(self, turn: Turn) -> AsyncIterator[str]:
        async for piece in turn.llm.stream(turn.messages(), system=turn.system):
            assert isinstance(piece, str)
            yield piece


def slow_build(setup: Setup) -> Answer:
    """Stands for an agent whose build takes seconds (a team of sub-agents, indexes, prompts)."""
    time.sleep(float(setup.options.get("build_s", 3.0)))
    return Answer(setup)
