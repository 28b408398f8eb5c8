"""Routing: weighted rendezvous hashing of ``thread_id`` over live replicas, in tiers.

Tiers (README.md, "Architecture in a few lines"): the thread's sticky replica while its depth is
below ``sticky_depth``; else the next replicas in the thread's own hash order below
``sticky_depth`` (``spill``); else any replica below ``max_depth``, least loaded first
(``overflow``); else the pool is saturated (503). Every router computes the same order from the
same membership, so several gateways agree on a thread's replica without talking.

Depth = ready + in flight. Each router knows exactly what it has outstanding per replica (the
requests it publishes and reads the replies of) and learns the rest from heartbeats, which are
up to a second old. A heartbeat's depth includes this router's own requests of that moment;
counting them again would make a replica look full for a whole heartbeat after a short burst
(measured: 4.5% of a low-load run spilled off its sticky replica that way). So the estimate is
"mine now + the others' share of the heartbeat + my fire-and-forget publishes since it", where
"mine at the heartbeat" is rebuilt from the times of this router's recent publishes and finishes.
The broker's ``x-max-length`` stays the hard bound.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass, field

from agentpool.broker.registry import ReplicaInfo
from agentpool.shared.config import Pool

_TWO_64 = float(2**64)
BLIND_TRIES = 3  # replicas estimated full that are still offered to the broker


def _score(thread_id: bytes, replica_id: str, weight: float) -> float:
    h = int.from_bytes(hashlib.blake2b(replica_id.encode() + b"\0" + thread_id, digest_size=8).digest())
    u = (h + 0.5) / _TWO_64  # in (0, 1)
    return -weight / math.log(u)  # weighted rendezvous: P(first) proportional to weight


def rendezvous_order(thread_id: str, replicas: list[tuple[str, float]]) -> list[str]:
    """Replica ids in ``thread_id``'s preference order; ``replicas`` are (id, weight)."""
    t = thread_id.encode()
    scored = sorted(((_score(t, rid, w), rid) for rid, w in replicas if w > 0), reverse=True)
    return [rid for _, rid in scored]


EVENT_WINDOW_S = 1.0  # events older than the heartbeat by this much can no longer matter
MAX_EVENTS = 4096  # per replica and kind: bounds memory for a replica that left membership


def _events() -> deque[float]:
    return deque(maxlen=MAX_EVENTS)


def _since(times: deque[float], t: float) -> int:
    """How many of the (ascending) ``times`` are after ``t``."""
    return len(times) - bisect.bisect_right(times, t)


@dataclass
class _Load:
    outstanding: int = 0  # published by this process and still being read here
    started: deque[float] = field(default_factory=_events)  # publish times of tracked requests
    ended: deque[float] = field(default_factory=_events)  # finish times of tracked requests
    untracked: deque[float] = field(default_factory=_events)  # publish times of fire-and-forget requests


class Router:
    """Per-process routing state for all pools."""

    def __init__(self, strategy: str = "tiered") -> None:
        self.strategy = strategy
        self._members: dict[str, list[ReplicaInfo]] = {}
        self._load: dict[str, _Load] = {}

    def update(self, pool: str, replicas: list[ReplicaInfo]) -> None:
        self._members[pool] = [r for r in replicas if r.status == "ready"]

    def members(self, pool: str) -> list[ReplicaInfo]:
        return self._members.get(pool, [])

    def depth(self, info: ReplicaInfo) -> int:
        load = self._load.get(info.id)
        if load is None:
            return info.depth
        hb = info.heartbeat_at
        for times in (load.started, load.ended, load.untracked):
            while times and times[0] < hb - EVENT_WINDOW_S:
                times.popleft()
        mine_at_hb = load.outstanding - _since(load.started, hb) + _since(load.ended, hb)
        others = max(0, info.depth - max(0, mine_at_hb))
        if others and info.avg_latency_ms > 0:
            # The others' requests of that moment have likely finished once a typical request
            # would have (longer while messages wait in the queue): fade their share over that.
            age_ms = max(0.0, (time.time() - hb) * 1000)
            relevant_ms = info.avg_latency_ms * (1 + info.ready)
            others = math.ceil(others * max(0.0, 1 - age_ms / relevant_ms))
        return load.outstanding + others + _since(load.untracked, hb)

    def plan(self, pool_name: str, pool: Pool, thread_id: str) -> list[tuple[str, str]]:
        """(replica id, tier) in the order to try them; empty = saturated or no replicas."""
        members = self._members.get(pool_name, [])
        if not members:
            return []
        weights = _replica_weights(pool, members)
        order = rendezvous_order(thread_id, [(r.id, weights[r.id]) for r in members])
        if self.strategy == "hash":  # no depth estimates: the thread's hash order, broker-bounded
            return [(rid, "sticky" if i == 0 else "spill") for i, rid in enumerate(order)]
        by_id = {r.id: r for r in members}
        depth = {rid: self.depth(by_id[rid]) for rid in order}
        sticky, max_depth = pool.limits.sticky_depth, pool.limits.max_depth
        plan: list[tuple[str, str]] = []
        if order and depth[order[0]] < sticky:
            plan.append((order[0], "sticky"))
        plan += [(rid, "spill") for rid in order[1:] if depth[rid] < sticky]
        rest = sorted((rid for rid in order if sticky <= depth[rid] < max_depth), key=depth.__getitem__)
        plan += [(rid, "overflow") for rid in rest]
        # Estimates lag (heartbeats are up to a second old); the broker's x-max-length is the truth.
        # So a few replicas estimated full are still tried, least loaded first: a nack moves on.
        full = sorted((rid for rid in order if depth[rid] >= max_depth), key=depth.__getitem__)
        plan += [(rid, "overflow") for rid in full[:BLIND_TRIES]]
        return plan

    def sticky_replica(self, pool_name: str, pool: Pool, thread_id: str) -> str | None:
        members = self._members.get(pool_name, [])
        weights = _replica_weights(pool, members)
        order = rendezvous_order(thread_id, [(r.id, weights[r.id]) for r in members])
        return order[0] if order else None

    def published(self, replica_id: str, tracked: bool) -> None:
        load = self._load.setdefault(replica_id, _Load())
        if tracked:
            load.outstanding += 1
            load.started.append(time.time())
        else:
            load.untracked.append(time.time())

    def finished(self, replica_id: str) -> None:
        load = self._load.get(replica_id)
        if load is not None and load.outstanding > 0:
            load.outstanding -= 1
            load.ended.append(time.time())


def _replica_weights(pool: Pool, members: list[ReplicaInfo]) -> dict[str, float]:
    """A deployment's weight split over its live replicas, so A/B shares hold per deployment."""
    dep_weight = {d.name: float(d.weight) for d in pool.deployments}
    count: dict[str, int] = {}
    for r in members:
        count[r.deployment] = count.get(r.deployment, 0) + 1
    return {r.id: dep_weight.get(r.deployment, 0.0) / count[r.deployment] for r in members}
