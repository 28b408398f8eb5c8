"""A team agent (``kind = "python"``): a planner splits a request into sub-tasks, hands each to a
specialist, and one synthesis call streams the answer.

The factory is slow on purpose (``options.build_s``, 2.5 s by default): it stands for the warm-up
a real team pays once per replica. Per request the agent makes ``2 + len(tasks)`` model calls
through ``turn.llm`` (plan, each specialist concurrently, the synthesis), so ``end.usage`` sums
all of them. The split and the routing are deterministic (sentences and "and", keywords), so the
example behaves the same on the fake model as on a real one; a real team would let the planner's
answer drive them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from agentpool.agent import Message, Reply, Setup, Step, Turn

DEFAULT_BUILD_S = 2.5
MAX_TASKS = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Specialist:
    """A sub-agent: its own system prompt, and the word stems that route a sub-task to it."""

    name: str
    system: str
    stems: tuple[str, ...] = ()

    def score(self, task: str) -> int:
        return sum(word.startswith(self.stems) for word in _WORD.findall(task.lower()))


PLANNER = Specialist(
    "planner",
    "You plan a support team's work: split the customer's message into at most three sub-tasks, "
    "one line each, and say which specialist (billing, shipping, tech) takes each.",
)
SPECIALISTS = (
    Specialist(
        "billing",
        "You are the billing specialist: charges, refunds, invoices and payment methods.",
        ("bill", "charg", "refund", "invoic", "pay", "price", "money"),
    ),
    Specialist(
        "shipping",
        "You are the shipping specialist: deliveries, tracking, parcels and addresses.",
        ("ship", "deliver", "track", "parcel", "packag", "arriv", "address", "courier"),
    ),
    Specialist(
        "tech",
        "You are the technical specialist: the app, logins, passwords, errors and crashes.",
        ("app", "login", "password", "error", "crash", "bug", "install", "updat"),
    ),
)
GENERALIST = Specialist("general", "You are a generalist support agent: answer what the others do not.")


def split_tasks(request: str, max_tasks: int = MAX_TASKS) -> list[str]:
    """Sentences, and clauses joined by "and", as sub-tasks; beyond ``max_tasks`` the rest
    stays together in the last one, so no part of the request is dropped."""
    parts = [
        p.strip(" ,;") for sentence in _SENTENCE_END.split(request.strip()) for p in _AND.split(sentence)
    ]
    tasks = [p for p in parts if p]
    if len(tasks) > max_tasks:
        tasks = [*tasks[: max_tasks - 1], " ".join(tasks[max_tasks - 1 :])]
    return tasks or [request.strip()]


def route(task: str, specialists: Sequence[Specialist] = SPECIALISTS) -> Specialist:
    """The specialist whose stems the task mentions most (the first listed on a tie), else the generalist."""
    best = max(specialists, key=lambda s: s.score(task))
    return best if best.score(task) else GENERALIST


class TeamAgent:
    """Built once per replica by :func:`build`; ``run`` is called once per request."""

    def __init__(self, planner: Specialist, specialists: Sequence[Specialist]) -> None:
        self.planner = planner
        self.specialists = tuple(specialists)

    async def run(self, turn: Turn) -> AsyncIterator[str | Step]:
        plan = await turn.llm.complete(turn.messages(), system=self.planner.system)
        tasks = split_tasks(turn.content)
        yield Step(name="plan", data={"tasks": tasks, "notes": plan.text})
        team = [(route(task, self.specialists), task) for task in tasks]
        for specialist, task in team:
            yield Step(name="handoff", data={"to": specialist.name, "task": task})
        replies = await asyncio.gather(*(self._consult(turn, s, task) for s, task in team))
        for (specialist, _), reply in zip(team, replies, strict=True):
            yield Step(name="report", data={"from": specialist.name, "text": reply.text})
        async for piece in turn.llm.stream(
            [*turn.history, Message("user", _synthesis_prompt(turn.content, team, replies))],
            system=turn.system,  # the pools file's system_prompt: the voice of the final answer
        ):
            if isinstance(piece, str):  # no tools are offered, so only text comes
                yield piece

    async def _consult(self, turn: Turn, specialist: Specialist, task: str) -> Reply:
        return await turn.llm.complete([*turn.history, Message("user", task)], system=specialist.system)


def _synthesis_prompt(request: str, team: list[tuple[Specialist, str]], replies: Sequence[Reply]) -> str:
    reports = "\n".join(
        f"- {s.name}, on {task!r}: {reply.text}" for (s, task), reply in zip(team, replies, strict=True)
    )
    return f"Write one reply to the customer from your specialists' reports.\n{reports}\nCustomer: {request}"


def build(setup: Setup) -> TeamAgent:
    """The factory the pools file names: runs once per replica, before the replica takes work."""
    build_s = float(setup.options.get("build_s", DEFAULT_BUILD_S))
    if build_s < 0:
        raise ValueError(f"options.build_s must be >= 0, got {build_s:g}")
    # Stands for the expensive part of a real team's warm-up: loading prompt libraries, a
    # retrieval index, a local classifier or model. A sync factory runs in a thread, so the
    # replica keeps heartbeating (as "starting") meanwhile.
    time.sleep(build_s)
    return TeamAgent(PLANNER, SPECIALISTS)
