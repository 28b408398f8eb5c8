"""Tools and agent factories the agent tests name in their pools files (``tests.agents_support:...``).

Module state counts what ran, so a test can tell how often a factory or a tool was called; the
workers of these tests run in the test's own process, except where a test starts processes.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from agentpool.agent import Setup, Step, Turn, tool

BUILDS: collections.Counter[str] = collections.Counter()  # replica id -> factory calls
CALLS: collections.Counter[str] = collections.Counter()  # tool name -> calls
CANCELLED: list[str] = []  # tools whose call was cancelled
ORDERS = {"A-1": "shipped", "B-2": "packing"}


def lookup_order(order_id: str) -> dict[str, str]:
    """Find an order's status.

    Args:
        order_id: the order id, like A-1
    """
    CALLS["lookup_order"] += 1
    _count_in_file("lookup_order")
    if order_id not in ORDERS:
        raise KeyError(f"no order {order_id}")
    return {"order_id": order_id, "status": ORDERS[order_id]}


async def nap(seconds: float) -> str:
    """Sleep, then say so (to see two calls run at once)."""
    CALLS["nap"] += 1
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        CANCELLED.append("nap")
        raise
    return f"slept {seconds:g}s"


async def nap2(seconds: float) -> str:
    """The same as nap, under another name."""
    return await nap(seconds)


def explode() -> str:
    """Always raises."""
    raise RuntimeError("the tool broke")


@tool(timeout_s=0.3)
async def dawdle() -> str:
    """Takes far longer than its own timeout."""
    await asyncio.sleep(30)
    return "never"


def again() -> str:
    """Asks the fake model for itself again: a loop that never ends by itself."""
    return "@again {}"


def refund(order_id: str, amount: float) -> str:
    """Refund an order (needs a human's approval in the tests).

    Args:
        order_id: the order id
        amount: how much to refund
    """
    CALLS["refund"] += 1
    _count_in_file("refund")
    return f"refunded {amount:g} on {order_id}"


class Unschemable:
    pass


def bad_signature(thing: Unschemable) -> str:
    """Its parameter type cannot become a JSON schema."""
    return "no"


def _count_in_file(name: str) -> None:
    """For tests whose workers are other processes: append the call to $AGENTPOOL_TEST_CALLS."""
    path = os.environ.get("AGENTPOOL_TEST_CALLS")
    if path:
        with Path(path).open("a") as f:
            f.write(name + "\n")


class Echo:
    """A python agent: two model calls, a custom step, and text of its own."""

    def __init__(self, setup: Setup) -> None:
        self.replica_id = setup.replica_id
        self.built_at = time.time()

    async def run(self, turn: Turn) -> AsyncIterator[str | Step]:
        plan = await turn.llm.complete(turn.messages(), system=turn.system)
        yield Step(name="plan", data={"replica": self.replica_id, "words": len(plan.text.split())})
        async for piece in turn.llm.stream(turn.messages(), system="Answer briefly."):
            assert isinstance(piece, str)
            yield piece
        yield f" (history {len(turn.history)})"


def slow_build(setup: Setup) -> Echo:
    """A sync factory that takes ``options.build_s`` seconds (3 s by default), counted per replica."""
    BUILDS[setup.replica_id] += 1
    time.sleep(float(setup.options.get("build_s", 3)))
    return Echo(setup)


async def async_build(setup: Setup) -> Echo:
    BUILDS[setup.replica_id] += 1
    return Echo(setup)


def broken_build(setup: Setup) -> Echo:
    BUILDS[setup.replica_id] += 1
    raise ValueError("the model weights are missing")


def not_an_agent(setup: Setup) -> int:
    return 42


class Looper:
    """A python agent that runs the built-in tool loop and adds a step of its own."""

    def __init__(self, setup: Setup) -> None:
        self.tools = setup.tools

    async def run(self, turn: Turn) -> AsyncIterator[object]:
        yield Step(name="start", data={"tools": [t.name for t in self.tools]})
        async for item in turn.loop():
            yield item


def loop_build(setup: Setup) -> Looper:
    return Looper(setup)
