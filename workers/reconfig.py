"""How a supervisor's fleet follows a new pools config, with no process restarted but the replicas
whose definition changed.

- New pools and deployments: the next reconcile round starts their replicas (pre-warmed pools count
  as used from now; tenants newly listed under a ``per_tenant`` pool get their pools).
- Replica counts: a deployment whose ``replicas`` changed runs the new count, even where
  ``agentpool scale`` set one before: the first supervisor to apply the change drops that
  override (``config:replicas:{pool}:{deployment}`` remembers the count last applied, so a second
  supervisor applying the same change leaves a newer ``scale`` alone).
- A deployment whose agent type, provider, or pool limits or validator changed: each supervisor
  marks its own replicas built from the old definition (generation -1), and rolling.py replaces
  them one at a time, as for a rolling restart. Marking rather than bumping the pool's restart
  generation keeps a supervisor that has not polled the new config yet from "restarting" replicas
  into the old one.
- A pool or deployment gone from the config: its replicas retire (drain, then exit).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agentpool.broker import tenants
from agentpool.broker.config_source import deployment_fingerprint
from agentpool.shared.config import Config, Pool
from agentpool.workers import procs, rolling

if TYPE_CHECKING:
    from agentpool.workers.supervisor import Supervisor

log = logging.getLogger("agentpool.supervisor")

OUTDATED = -1  # a replica generation older than any pool's: rolling.stale() replaces it


async def prepare(sup: Supervisor, new: Config) -> None:
    """The Redis side of taking ``new`` (before it is swapped in): count overrides it replaces,
    new pools marked used, new tenants' pools made."""
    old = sup.config
    for name, pool in new.pools.items():
        before = old.pools.get(name)
        for dep in pool.deployments:
            was = next((d for d in before.deployments if d.name == dep.name), None) if before else None
            if was is not None and was.replicas != dep.replicas:
                await _count_changed(sup, name, dep.name, dep.replicas)
        if before is None and pool.prewarm and not pool.per_tenant and sup.wants(name):
            await sup.fleet.touch(name)
    for name in set(tenants.configured(new)) - set(tenants.configured(old)):
        if sup.wants(name):
            await sup._ensure_tenant_pool(name)  # a pool limit is logged, not a failure


async def _count_changed(sup: Supervisor, pool: str, dep: str, replicas: int) -> None:
    marker = f"{sup.names.ns}:config:replicas:{pool}:{dep}"
    before = await sup.redis.set(marker, replicas, get=True)
    first = before is None or int(before) != replicas  # the first supervisor to apply this change
    if first and await sup.redis.delete(sup.names.desired(pool, dep)):
        log.info(
            "%s/%s: the config now says %d replicas; the count set at run time is dropped",
            pool,
            dep,
            replicas,
        )
    sup.memory.desired.pop((pool, dep), None)


def mark_outdated(sup: Supervisor) -> None:
    """Mark our replicas built from a definition the new config changed, for rolling replacement."""
    for r in sup.replicas.values():
        now = deployment_fingerprint(sup.config, r.pool, r.deployment)
        if r.stopping or now is None or now == r.fingerprint or r.generation == OUTDATED:
            continue
        r.generation = OUTDATED
        log.info("replica %s: its deployment's definition changed; it will be replaced", r.id)


def outdated(sup: Supervisor, pool: str) -> bool:
    return any(r.pool == pool and r.generation == OUTDATED and not r.stopping for r in sup.replicas.values())


async def retire_removed(sup: Supervisor, pool: str, cfg: Pool | None) -> None:
    """Retire our replicas of ``pool`` (``cfg`` None) or of its deployments the config no longer has."""
    keep = {d.name for d in cfg.deployments} if cfg is not None else set()
    for r in list(sup.replicas.values()):
        if r.pool != pool or r.deployment in keep or r.stopping:
            continue
        if not r.lost:
            await sup.leases.retire(r.pool, r.deployment, r.n, limit=-1)
        log.info(
            "retiring replica %s: its %s is gone from the config", r.id, "deployment" if keep else "pool"
        )
        procs.terminate(r)
    step = sup.restarts.get(pool)
    if step is not None and step.old.deployment not in keep:
        sup.restarts.pop(pool)
        await sup.leases.unlock(rolling.lock_name(pool))
