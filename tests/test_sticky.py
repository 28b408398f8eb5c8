"""Sticky placement: a thread returns to the replica that has its context; history is shared."""

from __future__ import annotations

import collections

import pytest

from agentpool.broker.router import rendezvous_order
from tests.conftest import System

pytestmark = pytest.mark.timeout(90)


def test_rendezvous_moves_only_the_leaving_replicas_threads() -> None:
    replicas = [(f"r{i}", 1.0) for i in range(5)]
    threads = [f"thread-{i}" for i in range(2000)]
    before = {t: rendezvous_order(t, replicas)[0] for t in threads}
    after = {t: rendezvous_order(t, [r for r in replicas if r[0] != "r2"])[0] for t in threads}
    moved = [t for t in threads if before[t] != after[t]]
    assert all(before[t] == "r2" for t in moved)  # nobody else's threads move
    assert 0.12 < len(moved) / len(threads) < 0.28  # ~1/5 were on r2


async def test_each_thread_sticks_to_one_replica_and_all_replicas_get_threads(make_system) -> None:
    system: System = await make_system(replicas=3, concurrency=4)
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for round_ in range(2):
        for i in range(100):
            reply = await system.client.ask("p", f"message {round_}", thread_id=f"thread-{i}")
            seen[reply.thread_id].add(reply.agent_id)
    assert all(len(agents) == 1 for agents in seen.values()), {t: a for t, a in seen.items() if len(a) > 1}
    per_replica = collections.Counter(next(iter(a)) for a in seen.values())
    assert set(per_replica) == {"p-main-1", "p-main-2", "p-main-3"}
    assert min(per_replica.values()) >= 15  # roughly even: rendezvous hashing spreads threads


async def test_same_thread_same_agent_and_history_reaches_the_model(make_system) -> None:
    system: System = await make_system(replicas=3)
    first = await system.client.ask("p", "my name is Ada", thread_id="conv-1")
    second = await system.client.ask("p", "what is my name?", thread_id="conv-1")
    assert first.agent_id == second.agent_id
    assert first.content.startswith("[0 earlier]")
    assert second.content.startswith("[2 earlier]")  # the worker saw the first user turn and its answer


async def test_history_is_shared_by_all_replicas_of_the_pool(make_system) -> None:
    # Given a conversation on its sticky replica
    system: System = await make_system(replicas=2)
    first = await system.client.ask("p", "remember 42", thread_id="conv-2")
    # When that replica goes away
    await system.stop_worker(first.agent_id)
    await system.wait_members("p")
    # Then the other replica continues the thread with its whole history
    second = await system.client.ask("p", "what did I say?", thread_id="conv-2")
    assert second.agent_id != first.agent_id
    assert second.content.startswith("[2 earlier]")
    third = await system.client.ask("p", "and now?", thread_id="conv-2")
    assert third.content.startswith("[4 earlier]")
