"""Rolling restart: replace replicas started before the pool's restart generation, one at a time.

``POST /v1/pools/{pool}/restart`` bumps ``restart:{pool}``; ``POST /v1/pools/{pool}/agents/{id}/drain``
marks one replica (by pid, in ``drain:{pool}``) to be replaced the same way. A supervisor holding a
stale replica takes the pool's restart lock (one step at a time across every supervisor), starts a
replacement in an extra slot (desired + 1, so capacity never drops below desired), waits until it
is ready, then retires the stale replica (drain) and releases the lock once it has exited.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentpool.broker.fleet import PoolSnapshot
from agentpool.workers import procs
from agentpool.workers.procs import Replica

if TYPE_CHECKING:
    from agentpool.workers.supervisor import Supervisor

log = logging.getLogger("agentpool.supervisor")

STEP_TIMEOUT_S = 60.0  # a replacement not ready by then: give the step up, try again later


@dataclass
class Step:
    old: Replica
    new: Replica
    since: float  # monotonic
    retired: bool = False


def lock_name(pool: str) -> str:
    return f"restart:{pool}"


def stale(sup: Supervisor, snap: PoolSnapshot) -> list[Replica]:
    """Our running replicas of the pool started before its current restart generation, or asked
    to drain."""
    return [
        r
        for r in sup.replicas.values()
        if r.pool == snap.name
        and not r.stopping
        and (r.generation < snap.restart_generation or (r.pid and snap.drains.get(r.id) == r.pid))
    ]


async def _forget_drains(sup: Supervisor, snap: PoolSnapshot) -> None:
    """Drop drain requests for a process of ours that is gone (exited, or replaced in its slot)."""
    for rid, pid in snap.drains.items():
        ours = next((r for r in sup.replicas.values() if r.pool == snap.name and r.id == rid), None)
        if ours is not None and ours.pid != pid and not (ours.stopping and ours.alive):
            await sup.fleet.drained(snap.name, rid)


async def advance(sup: Supervisor, snap: PoolSnapshot) -> None:
    """Begin, progress or finish this supervisor's restart step for one pool."""
    if snap.drains:
        await _forget_drains(sup, snap)
    step = sup.restarts.get(snap.name)
    if step is None:
        await _begin(sup, snap)
    elif not step.retired:
        await _retire_old(sup, snap, step)
    elif not step.old.alive:
        if step.old.proc is not None and snap.drains.get(step.old.id) == step.old.pid:
            await sup.fleet.drained(snap.name, step.old.id)
        await _finish(sup, snap.name, "done")


async def _begin(sup: Supervisor, snap: PoolSnapshot) -> None:
    todo = stale(sup, snap)
    if not todo or not await sup.leases.lock(lock_name(snap.name)):
        return
    old = min(todo, key=lambda r: sup.rank(snap, r.deployment, r.n))
    n = await sup.leases.claim(snap.name, old.deployment, snap.desired(old.deployment) + 1)
    if n is None:
        await sup.leases.unlock(lock_name(snap.name))
        return
    new = await sup.start(snap.name, old.deployment, n, snap.restart_generation)
    sup.restarts[snap.name] = Step(old, new, time.monotonic())
    log.info("rolling restart of %s: replacing %s with %s", snap.name, old.id, new.id)


async def _retire_old(sup: Supervisor, snap: PoolSnapshot, step: Step) -> None:
    ready = any(r.id == step.new.id and r.pid == step.new.pid and r.status == "ready" for r in snap.replicas)
    if not ready:
        if time.monotonic() - step.since > STEP_TIMEOUT_S:
            await _finish(sup, snap.name, f"{step.new.id} not ready in {STEP_TIMEOUT_S:.0f}s; will retry")
        return
    if step.old.stopping:
        step.retired = True
        return
    limit = snap.desired(step.old.deployment)
    if await sup.leases.retire(step.old.pool, step.old.deployment, step.old.n, limit):
        procs.terminate(step.old)
        step.retired = True


async def _finish(sup: Supervisor, pool: str, how: str) -> None:
    sup.restarts.pop(pool, None)
    await sup.leases.unlock(lock_name(pool))
    log.info("rolling restart step of %s: %s", pool, how)
