"""Which slot a worker process runs, and the guards that keep replica ids unique.

- ``--replica N`` (the supervisor's children): the supervisor holds slot N's lease. The child
  watches its parent: if the supervisor dies, the child drains and exits rather than run on as an
  orphan next to the replacement another supervisor starts in the same slot.
- ``--replica auto`` (one replica per container, e.g. a Kubernetes pod): the process claims the
  lowest free slot itself through the same Redis lease and renews it; if the lease is lost (taken
  by another owner after a long Redis outage) it drains and exits.

A per-tenant pool (``{template}--{tenant}``) runs with its template's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from agentpool.broker import tenants
from agentpool.broker.leases import MAX_SLOTS, Leases, new_owner_id
from agentpool.broker.redis_conn import REDIS_ERRORS, connect, translated
from agentpool.shared.config import Config
from agentpool.shared.errors import ConfigError, Unavailable
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings
from agentpool.shared.tasks import cancel_and_wait

log = logging.getLogger("agentpool.worker")

PARENT_ENV = "AGENTPOOL_PARENT_PID"
WATCH_S = 0.5


def pool_config(config: Config, pool: str) -> Config:
    """``config`` able to run ``pool`` (a per-tenant pool becomes an ordinary one)."""
    try:
        return tenants.materialize(config, pool)
    except KeyError:
        raise ConfigError(f"no pool {pool!r} in the pools file (nor a per_tenant template for it)") from None


@contextlib.asynccontextmanager
async def replica_slot(
    settings: Settings,
    config: Config,
    pool: str,
    deployment: str,
    n: int | None,
    stop: asyncio.Event,
) -> AsyncIterator[tuple[Config, int]]:
    """Yield (config, slot number) to run; guard the slot until the block ends."""
    config = pool_config(config, pool)
    config.deployment(pool, deployment)  # KeyError early for a deployment that does not exist
    guards = [asyncio.create_task(_watch_parent(stop))]
    redis = connect(settings.redis_url)
    leases = Leases(redis, Names(settings.namespace), new_owner_id("replica"))
    try:
        if n is None:
            n = await _claim(leases, settings, pool, deployment)
            guards.append(asyncio.create_task(_keep(leases, pool, deployment, n, stop)))
            log.info("replica %s-%s-%d: slot claimed", pool, deployment, n)
        yield config, n
    finally:
        await cancel_and_wait(guards)
        if n is not None and len(guards) > 1:
            with contextlib.suppress(*REDIS_ERRORS):
                await leases.release(pool, deployment, n)
        await redis.aclose()


async def _claim(leases: Leases, settings: Settings, pool: str, deployment: str) -> int:
    with translated(settings.redis_url):
        n = await leases.claim(pool, deployment, MAX_SLOTS)
    if n is None:
        raise Unavailable(
            f"every one of the {MAX_SLOTS} slots of {pool}/{deployment} is taken", error_code="POOL_LIMIT"
        )
    return n


async def _keep(leases: Leases, pool: str, deployment: str, n: int, stop: asyncio.Event) -> None:
    """Renew our own lease; drain if another owner took it."""
    while not stop.is_set():
        await asyncio.sleep(WATCH_S)
        try:
            if not await leases.renew(pool, deployment, n):
                log.error("lease of slot %s-%s-%d taken by another owner; draining", pool, deployment, n)
                stop.set()
        except REDIS_ERRORS as e:
            log.warning("lease renewal failed: %s", e)


async def _watch_parent(stop: asyncio.Event) -> None:
    """Under a supervisor: drain when it is gone (we were re-parented)."""
    raw = os.environ.get(PARENT_ENV)
    if not raw or not raw.isdigit():
        return
    while not stop.is_set():
        if os.getppid() != int(raw):
            log.warning("supervisor (pid %s) is gone; draining", raw)
            stop.set()
            return
        await asyncio.sleep(WATCH_S)
