"""``agentpool status [POOL]``: the fleet status of broker/fleet.py, as plain-text tables."""

from __future__ import annotations

import asyncio
import time

from agentpool.broker.fleet import Fleet, Health, PoolStatus
from agentpool.broker.history import RECENT_S
from agentpool.broker.redis_conn import connect, translated
from agentpool.shared.config import Config
from agentpool.shared.errors import NotFound
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)).rstrip() for ln in lines)


def _ago(ts: float | None, now: float) -> str:
    return "-" if not ts else f"{max(0.0, now - ts):.1f}s ago"


def pools_table(statuses: list[PoolStatus]) -> str:
    rows = [
        [
            s.pool,
            s.status,
            d.name,
            f"{d.ready}/{d.desired}",
            str(d.configured),
            str(d.starting),
            str(d.draining),
            str(s.requests),
            str(s.cold_starts),
        ]
        for s in statuses
        for d in s.deployments
    ]
    return table(
        [
            "POOL",
            "STATUS",
            "DEPLOYMENT",
            "READY/DESIRED",
            "CONFIGURED",
            "STARTING",
            "DRAINING",
            "REQUESTS",
            "COLD STARTS",
        ],
        rows,
    )


def replicas_table(s: PoolStatus, now: float) -> str:
    rows = [
        [
            r.id,
            r.status,
            str(r.depth),
            str(r.in_flight),
            str(r.processed),
            str(r.errors),
            f"{r.avg_latency_ms:.1f}",
            f"{r.build_ms:.0f}",
            _ago(r.started_at, now),
            _ago(r.last_heartbeat, now),
            r.detail,
        ]
        for r in s.replicas
    ]
    head = f"pool {s.pool}: {s.status}" + (" (asleep: idle past its idle_timeout_s)" if s.asleep else "")
    return (
        head
        + "\n"
        + table(
            [
                "REPLICA",
                "STATUS",
                "DEPTH",
                "IN FLIGHT",
                "PROCESSED",
                "ERRORS",
                "AVG MS",
                "BUILD MS",
                "STARTED",
                "HEARTBEAT",
                "DETAIL",
            ],
            rows,
        )
    )


def traffic_table(s: PoolStatus) -> str:
    """Per deployment, its configured share next to what its replicas answered of late."""
    rows = [
        [
            d.name,
            str(d.weight),
            f"{d.share:.1%}",
            f"{r.share:.1%}",
            str(r.requests),
            f"{r.error_rate:.1%}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            str(r.input_tokens + r.output_tokens),
        ]
        for d in s.deployments
        if (r := d.recent) is not None
    ]
    head = [
        "DEPLOYMENT",
        "WEIGHT",
        "SHARE",
        "MEASURED",
        "REQUESTS",
        "ERROR RATE",
        "P50 MS",
        "P99 MS",
        "TOKENS",
    ]
    return f"traffic over the last {RECENT_S // 60} min\n" + table(head, rows)


def health_line(h: Health) -> str:
    return (
        f"{h.healthy_pools}/{h.total_pools} pools healthy; {h.active_requests} active requests; "
        f"{h.total_requests} total; avg response {h.avg_response_ms:.1f} ms"
    )


async def render(settings: Settings, config: Config, pool: str | None) -> str:
    redis = connect(settings.redis_url)
    try:
        with translated(settings.redis_url):
            fleet = Fleet(redis, Names(settings.namespace), config)
            now = time.time()
            if pool is not None:
                await _known(fleet, [pool])
                s = await fleet.status(pool, traffic=True)
                return "\n\n".join([pools_table([s]), replicas_table(s, now), traffic_table(s)])
            statuses = await fleet.statuses()
            return pools_table(statuses) + "\n\n" + health_line(Health.of(statuses))
    finally:
        await redis.aclose()


async def wait_ready(
    settings: Settings, config: Config, pools: list[str], timeout_s: float
) -> tuple[bool, list[str]]:
    """Poll until each pool (default: every pool that wants replicas) has every replica it wants
    ready -> (all ready in time, one line per pool ``support: 3/3 ready``)."""
    redis = connect(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        with translated(settings.redis_url):
            fleet = Fleet(redis, Names(settings.namespace), config)
            known = await _known(fleet, pools)
            while True:
                statuses = [await fleet.status(p) for p in known if not pools or p in pools]
                counts = [(s.pool, *_ready_of(s)) for s in statuses]
                waiting = [c for c in counts if c[1] < c[2]]
                lines = [f"{name}: {ready}/{want} ready" for name, ready, want in counts if pools or want]
                if not waiting or time.monotonic() >= deadline:
                    return not waiting, lines
                await asyncio.sleep(0.2)
    finally:
        await redis.aclose()


async def _known(fleet: Fleet, pools: list[str]) -> list[str]:
    """Every pool name; NotFound for a name in ``pools`` that is none of them."""
    known = await fleet.pool_names()
    for p in pools:
        if p not in known:
            raise NotFound(f"no pool named {p!r}", error_code="POOL_NOT_FOUND")
    return known


def _ready_of(s: PoolStatus) -> tuple[int, int]:
    return sum(min(d.ready, d.desired) for d in s.deployments), sum(d.desired for d in s.deployments)
