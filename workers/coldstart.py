"""Cold starts: requests that waited for a pool at zero replicas to wake.

The client publishes such a request to the pool's shared queue with tier ``queued`` and wakes the
pool (or, if a replica is up by the time it looks again, straight to it, marked ``woke``); the
replica that takes it reports, in ``Timings.cold_start_ms``, how long the request waited
for a replica to become ready. Each one is counted in Redis (``cold_starts`` hash, shown by the
status API) and handed to the metrics module when it offers ``observe_cold_start(pool, ms)``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentpool.broker.fleet import FleetKeys
from agentpool.broker.redis_conn import REDIS_ERRORS
from agentpool.shared.messages import Request

if TYPE_CHECKING:
    from agentpool.broker.registry import ReplicaInfo
    from agentpool.workers.runtime import Worker

log = logging.getLogger("agentpool.worker")


def cold_start_ms(req: Request, info: ReplicaInfo) -> float:
    """Published -> this replica ready, for a request that found its pool with no live replica
    (queued, or routed to the first replica as it came up: a standby can be that quick)."""
    if req.tier != "queued" and not req.woke:
        return 0.0
    ready_at = info.started_at + info.warmup_ms / 1000
    return round(max(0.0, (ready_at - req.created_at) * 1000), 3)


def _metrics_hook() -> Callable[[str, float], None] | None:
    """``agentpool.shared.metrics.observe_cold_start`` if the metrics module exists and defines it."""
    try:
        metrics = importlib.import_module("agentpool.shared.metrics")
    except ImportError:
        return None
    hook = getattr(metrics, "observe_cold_start", None)
    return hook if callable(hook) else None


async def record(worker: Worker, pool: str, ms: float) -> None:
    """Count one cold start (Redis, for status pages; the metrics hook, for Prometheus)."""
    hook = _metrics_hook()
    if hook is not None:
        hook(pool, ms)
    try:
        await worker.redis.hincrby(FleetKeys(worker.names).cold_starts, pool, 1)
    except REDIS_ERRORS as e:
        log.warning("could not count a cold start of %s: %s", pool, e)
