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
import functools
import hashlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import msgspec

from agentpool.broker.history import latency_index
from agentpool.broker.registry import ReplicaInfo
from agentpool.shared.config import STRATEGIES, Config, Pool
from agentpool.shared.errors import ConfigError
from agentpool.shared.messages import Request
from agentpool.workers.imports import import_object

log = logging.getLogger("agentpool.router")

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
        self.strategy = strategy  # of the sticky strategy: tiered, or hash (no depth estimates)
        self._members: dict[str, list[ReplicaInfo]] = {}
        self._load: dict[str, _Load] = {}
        self._turns: dict[str, int] = {}  # round_robin: the next turn per pool/deployment
        self._rng = random.Random()
        self._failed: set[str] = set()  # custom strategies that raised (logged once)

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

    def plan(
        self, pool_name: str, pool: Pool, thread_id: str, request: Request | None = None, run: int = 0
    ) -> list[tuple[str, str]]:
        """(replica id, tier) in the order to try them; empty = saturated or no replicas.

        The thread's deployment comes first (weighted rendezvous over the deployments, so an A/B
        split holds per thread while replicas come and go); the pool's strategy orders replicas
        within it, and the other deployments' follow as the fallback. ``run`` (a fan-out's run
        index) rotates the order, so N runs of one thread spread over distinct replicas."""
        members = self._members.get(pool_name, [])
        if not members:
            return []
        if pool.strategy == "sticky":
            order = _rotate(self._sticky_order(pool, members, thread_id), run)
            return self._tiers(pool, order, {r.id: r for r in members})
        by_dep = _by_deployment(members)
        deps = _deployment_order(pool, by_dep, thread_id)
        depth = {r.id: self.depth(r) for r in members}  # once per plan, this pool's replicas only
        if pool.strategy in ("round_robin", "random", "least_loaded"):
            # round_robin advances per call, so a fan-out's runs are dealt in turn without rotating
            order = [rid for d in deps for rid in self._order(pool_name, pool.strategy, by_dep[d], depth)]
            if pool.strategy != "round_robin":
                order = _rotate(order, run)
        else:
            ordered = [r for d in deps for r in by_dep[d]]
            order = _rotate(self._custom(pool, ordered, thread_id, request, depth), run)
        return _bounded(pool, order, pool.strategy, depth)

    def _tiers(self, pool: Pool, order: list[str], by_id: dict[str, ReplicaInfo]) -> list[tuple[str, str]]:
        """The sticky strategy: the thread's replica, spill in its hash order, then overflow to the
        least loaded; all within the thread's deployment while it has room below ``max_depth``,
        so an A/B arm keeps its threads under load too, and only then the other deployments'."""
        if self.strategy == "hash":  # no depth estimates: the thread's hash order, broker-bounded
            return [(rid, "sticky" if i == 0 else "spill") for i, rid in enumerate(order)]
        if not order:
            return []
        depth = {rid: self.depth(by_id[rid]) for rid in order}
        sticky, max_depth = pool.limits.sticky_depth, pool.limits.max_depth
        home = by_id[order[0]].deployment
        own = [rid for rid in order if by_id[rid].deployment == home]
        mine = set(own)
        plan: list[tuple[str, str]] = []
        if depth[own[0]] < sticky:
            plan.append((own[0], "sticky"))
        plan += [(rid, "spill") for rid in own[1:] if depth[rid] < sticky]
        rest = sorted((rid for rid in own if sticky <= depth[rid] < max_depth), key=depth.__getitem__)
        plan += [(rid, "overflow") for rid in rest]
        away = sorted(
            (rid for rid in order if rid not in mine and depth[rid] < max_depth), key=depth.__getitem__
        )
        plan += [(rid, "overflow") for rid in away]
        # Estimates lag (heartbeats are up to a second old); the broker's x-max-length is the truth.
        # So a few replicas estimated full are still tried, least loaded first: a nack moves on.
        full = sorted((rid for rid in order if depth[rid] >= max_depth), key=depth.__getitem__)
        plan += [(rid, "overflow") for rid in full[:BLIND_TRIES]]
        return plan

    def _order(
        self, pool_name: str, strategy: str, replicas: list[ReplicaInfo], depth: dict[str, int]
    ) -> list[str]:
        """One deployment's replicas in a built-in strategy's order."""
        if strategy == "round_robin":
            # A counter per process and deployment, from a random start: each process deals
            # exactly in turn (its counts differ by at most one), so G gateways differ by <= G.
            ids = sorted(r.id for r in replicas)
            key = f"{pool_name}/{replicas[0].deployment}"
            turn = self._turns.get(key)
            if turn is None:
                turn = self._rng.randrange(1 << 30)
            self._turns[key] = turn + 1
            return _rotate(ids, turn)
        if strategy == "random":
            ids = [r.id for r in replicas]
            self._rng.shuffle(ids)
            return ids

        # least_loaded: the lowest depth estimate, ties by latency (p50 of its latest requests, in
        # 25 % bands), then at random: gateways that see the same heartbeats must not all pick the
        # same idle replica until the next one
        def rank(r: ReplicaInfo) -> tuple[int, int, float]:
            return (depth[r.id], latency_index(r.p50_latency_ms or r.avg_latency_ms), self._rng.random())

        return [r.id for r in sorted(replicas, key=rank)]

    def _custom(
        self,
        pool: Pool,
        replicas: list[ReplicaInfo],
        thread_id: str,
        request: Request | None,
        depth: dict[str, int],
    ) -> list[str]:
        """A ``module:callable`` strategy's order; a strategy that fails falls back to sticky's."""
        candidates = [
            Candidate(
                id=r.id,
                deployment=r.deployment,
                depth=depth[r.id],
                latency_ms=r.p50_latency_ms or r.avg_latency_ms,
                in_flight=r.in_flight,
                processed=r.processed,
                errors=r.errors,
            )
            for r in replicas
        ]
        try:
            fn = _strategy(pool.strategy)
            chosen = fn(candidates, request)
            known = {c.id for c in candidates}
            order = [c if isinstance(c, str) else c.id for c in chosen]
            return [rid for rid in dict.fromkeys(order) if rid in known]
        except Exception:
            if pool.strategy not in self._failed:
                log.exception("strategy %s failed; routing by the thread's hash instead", pool.strategy)
            self._failed.add(pool.strategy)
            return self._sticky_order(pool, replicas, thread_id)

    def sticky_replica(self, pool_name: str, pool: Pool, thread_id: str) -> str | None:
        order = self._sticky_order(pool, self._members.get(pool_name, []), thread_id)
        return order[0] if order else None

    @staticmethod
    def _sticky_order(pool: Pool, members: list[ReplicaInfo], thread_id: str) -> list[str]:
        """The thread's hash order: its deployment's replicas, then the other deployments'."""
        by_dep = _by_deployment(members)
        return [
            rid
            for d in _deployment_order(pool, by_dep, thread_id)
            for rid in rendezvous_order(thread_id, [(r.id, 1.0) for r in by_dep[d]])
        ]

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


def _bounded(pool: Pool, order: list[str], tier: str, depth: dict[str, int]) -> list[tuple[str, str]]:
    """A strategy's order within the admission bound: replicas estimated below ``max_depth`` in
    that order, then a few estimated full (least loaded first) for the broker to decide."""
    max_depth = pool.limits.max_depth
    plan = [(rid, tier) for rid in order if depth[rid] < max_depth]
    full = sorted((rid for rid in order if depth[rid] >= max_depth), key=depth.__getitem__)
    return plan + [(rid, "overflow") for rid in full[:BLIND_TRIES]]


def _by_deployment(members: list[ReplicaInfo]) -> dict[str, list[ReplicaInfo]]:
    by_dep: dict[str, list[ReplicaInfo]] = {}
    for r in members:
        by_dep.setdefault(r.deployment, []).append(r)
    return by_dep


def _deployment_order(pool: Pool, by_dep: dict[str, list[ReplicaInfo]], thread_id: str) -> list[str]:
    """The deployments with live replicas in the thread's weighted rendezvous order: the first is
    the thread's own, with probability weight / total (a deployment of weight 0 gets no threads)."""
    weights = {d.name: float(d.weight) for d in pool.deployments}
    return rendezvous_order(thread_id, [(d, weights.get(d, 0.0)) for d in by_dep])


def _rotate(order: list[str], n: int) -> list[str]:
    if not order or n % len(order) == 0:
        return order
    k = n % len(order)
    return order[k:] + order[:k]


class Candidate(msgspec.Struct, kw_only=True, frozen=True):
    """A replica as a custom strategy sees it (ready ones only: unhealthy, starting and draining
    replicas are never offered). ``depth``: the router's estimate of ready + in flight."""

    id: str
    deployment: str
    depth: int
    latency_ms: float  # p50 of its latest requests (0 before it served any)
    in_flight: int
    processed: int
    errors: int


Strategy = Callable[[list[Candidate], Request | None], Sequence[str | Candidate]]


@functools.cache
def _strategy(path: str) -> Strategy:
    fn = import_object(path, "strategy")
    if not callable(fn):
        raise ConfigError(f"strategy {path!r} is not callable")
    return cast(Strategy, fn)


def check_strategies(config: Config) -> None:
    """Import every pool's custom strategy now (a client's start, a config about to apply): one that
    does not import is a ConfigError naming the pool, not a per-request fallback to the hash."""
    for name, pool in config.pools.items():
        if pool.strategy not in STRATEGIES:
            try:
                _strategy(pool.strategy)
            except ConfigError as e:
                raise ConfigError(f"pools.{name}.strategy: {e.message}") from None
