"""Fleet state in Redis: desired replicas, pool activity, restart generations, and pool status.

Shared by the supervisor (what to run), the gateway admin API and ``agentpool status`` (what runs),
so every one of them reads the same keys the same way:

- ``desired:{pool}:{deployment}`` desired replicas set at run time (default: the pools file);
- ``activity`` sorted set pool -> last request (unix s); a pool idle for ``idle_timeout_s`` runs
  only ``min_replicas`` per deployment until a request wakes it; ``requests`` hash pool -> count;
- ``restart:{pool}`` the rolling-restart generation; replicas started before it are replaced;
- channel ``fleet``: a nudge (``desired:``/``wake:``/``restart:``/``tenant:`` + pool) so supervisors
  act at once instead of at their next poll;
- ``fleet:epoch`` a token the first supervisor writes; finding it gone means Redis lost its data,
  and each running supervisor writes back what it remembers (:class:`FleetMemory`).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Literal, cast

import msgspec
import redis.asyncio as aredis

from agentpool.broker import history, tenants
from agentpool.broker.history import Traffic
from agentpool.broker.registry import Registry, ReplicaInfo
from agentpool.shared.config import Config, Pool
from agentpool.shared.names import Names

log = logging.getLogger("agentpool.fleet")

DRAIN_TTL_S = 300  # a drain request no supervisor acted on by then is forgotten
PoolHealth = Literal["healthy", "degraded", "unhealthy", "idle"]


class FleetKeys:
    def __init__(self, names: Names) -> None:
        self.names = names
        ns = names.ns
        self.activity = f"{ns}:activity"
        self.requests = f"{ns}:requests"
        self.cold_starts = f"{ns}:cold_starts"
        self.channel = f"{ns}:fleet"
        self.epoch = f"{ns}:fleet:epoch"

    def restart(self, pool: str) -> str:
        return f"{self.names.ns}:restart:{pool}"


def effective_desired(base: int, pool: Pool, last_request_at: float | None, now: float) -> int:
    """Replicas to run now: ``base``, or at most ``min_replicas`` while the pool is idle."""
    return min(base, pool.min_replicas) if asleep(pool, last_request_at, now) else base


def asleep(pool: Pool, last_request_at: float | None, now: float) -> bool:
    """Idle past ``idle_timeout_s``. With no activity record yet (a supervisor has not booted, or
    the record was lost), a ``prewarm`` pool is awake: it counts as used from the start."""
    if last_request_at is None:
        return not pool.prewarm
    return now - last_request_at > pool.idle_timeout_s


class Fleet:
    """Reads and writes of the fleet keys; the status computation."""

    def __init__(self, redis: aredis.Redis, names: Names, config: Config) -> None:
        self.redis = redis
        self.names = names
        self.config = config
        self.keys = FleetKeys(names)
        self.registry = Registry(redis, names)
        self.tenants = tenants.TenantPools(redis, names, config)

    # --- writes
    async def nudge(self, what: str, pool: str) -> None:
        await self.redis.publish(self.keys.channel, f"{what}:{pool}")

    async def touch(self, pool: str, at: float | None = None) -> None:
        """Record a request (keeps the pool awake; ``GT`` so an older write never wins)."""
        await self.redis.zadd(self.keys.activity, {pool: at or time.time()}, gt=True)

    async def wake(self, pool: str) -> None:
        """A request waits for a pool with no live replica: mark it used and tell supervisors now."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.activity, {pool: time.time()}, gt=True)
        pipe.publish(self.keys.channel, f"wake:{pool}")
        await pipe.execute()

    async def set_desired(self, pool: str, deployment: str, replicas: int) -> None:
        """Scale a deployment; also counts as activity, so an idle pool scales at once too."""
        await self.redis.set(self.names.desired(pool, deployment), replicas)
        await self.touch(pool)
        await self.nudge("desired", pool)

    async def drain(self, pool: str, replica: ReplicaInfo) -> None:
        """Ask the supervisor running ``replica`` to replace it: a new replica starts, and once it is
        ready this one drains (stops taking work, finishes what it has) and exits. Keyed by pid, so
        a later process in the same slot is not drained by an old request."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.names.drains(pool), replica.id, replica.pid)
        pipe.expire(self.names.drains(pool), DRAIN_TTL_S)
        await pipe.execute()
        await self.nudge("drain", pool)

    async def drained(self, pool: str, replica_id: str) -> None:
        await self.redis.hdel(self.names.drains(pool), replica_id)

    async def restart(self, pool: str) -> int:
        gen = int(await self.redis.incr(self.keys.restart(pool)))
        await self.nudge("restart", pool)
        return gen

    # --- reads
    def pool_config(self, name: str) -> Pool | None:
        return tenants.pool_config(self.config, name)

    async def pool_names(self) -> list[str]:
        """Static pools, then the per-tenant pools made so far."""
        return tenants.static_pools(self.config) + await self.tenants.names()

    async def snapshot(self, pool: str, now: float | None = None, traffic: bool = False) -> PoolSnapshot:
        """Everything about one pool in one round trip (plus the registry's read); with ``traffic``,
        each deployment's requests over the last :data:`~agentpool.broker.history.RECENT_S` too."""
        cfg = self.pool_config(pool)
        if cfg is None:
            raise KeyError(pool)
        now = now or time.time()
        buckets = history.recent_buckets(now) if traffic else []
        pipe = self.redis.pipeline(transaction=False)
        for d in cfg.deployments:
            pipe.get(self.names.desired(pool, d.name))
        pipe.zscore(self.keys.activity, pool)
        pipe.get(self.keys.restart(pool))
        pipe.hget(self.keys.requests, pool)
        pipe.hget(self.keys.cold_starts, pool)
        pipe.hgetall(self.names.drains(pool))
        for b in buckets:
            pipe.hgetall(self.names.history(pool, b))
        res = await pipe.execute()
        k = len(cfg.deployments)
        pairs = zip(cfg.deployments, res[:k], strict=True)
        base, stored = {}, []
        for d, raw in pairs:
            base[d.name] = int(raw) if raw is not None else d.replicas
            if raw is not None:
                stored.append(d.name)
        last, gen, requests, cold, drains = res[k : k + 5]
        last_at = float(last) if last is not None else None
        return PoolSnapshot(
            name=pool,
            config=cfg,
            base=base,
            stored=stored,
            last_request_at=last_at,
            restart_generation=int(gen or 0),
            requests=int(requests or 0),
            cold_starts=int(cold or 0),
            drains={k.decode(): int(v) for k, v in drains.items()},
            replicas=await self.registry.replicas(pool),
            now=now,
            traffic=history.traffic(res[k + 5 :], list(base)) if traffic else None,
        )

    async def status(self, pool: str, traffic: bool = False) -> PoolStatus:
        """The pool's status; ``traffic`` adds each deployment's ``recent`` figures (the A/B as measured)."""
        return (await self.snapshot(pool, traffic=traffic)).status()

    async def statuses(self) -> list[PoolStatus]:
        return [await self.status(p) for p in await self.pool_names()]


class FleetMemory:
    """What one supervisor has seen of the fleet's Redis state, so that a Redis that lost its data
    (a restart without persistence) never scales a pool down or forgets a count set at run time.

    While a desired count or an activity record it saw is missing, the supervisor goes on with the
    remembered value (:meth:`fill`). When the epoch token is gone, Redis lost everything: it writes
    back the desired counts and the per-tenant pools it knew, and marks every pool used now, so the
    idle clock starts again from the loss rather than treating the pools as long idle.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.epoch: bytes | None = None
        self.desired: dict[tuple[str, str], int] = {}
        self.activity: dict[str, float] = {}
        self.tenant_pools: set[str] = set()

    async def check(self) -> bool:
        """True when Redis lost the fleet's state since the last check (restored by then)."""
        redis, key = self.fleet.redis, self.fleet.keys.epoch
        found = cast(bytes | None, await redis.get(key))
        if found is not None:
            self.epoch = found
            return False
        await redis.set(key, self.epoch or secrets.token_hex(8).encode(), nx=True)
        lost, self.epoch = self.epoch is not None, cast(bytes | None, await redis.get(key))
        if lost:
            await self.restore()
        return lost

    async def restore(self) -> None:
        log.warning(
            "Redis lost the fleet's state (a restart without persistence?): writing back %d desired "
            "count(s) and %d per-tenant pool(s) from memory; every pool counts as used now",
            len(self.desired),
            len(self.tenant_pools),
        )
        now = time.time()
        pipe = self.fleet.redis.pipeline(transaction=False)
        for (pool, dep), n in self.desired.items():
            pipe.set(self.fleet.names.desired(pool, dep), n, nx=True)
        for pool in {*self.activity, *self.tenant_pools}:
            pipe.zadd(self.fleet.keys.activity, {pool: now}, gt=True)
        await pipe.execute()
        for name in sorted(self.tenant_pools):
            await self.fleet.tenants.ensure(name, now)

    def saw_pools(self, listed: list[str]) -> None:
        self.tenant_pools = {p for p in listed if tenants.split(p) is not None}

    def fill(self, snap: PoolSnapshot) -> PoolSnapshot:
        """Remember what Redis holds; where it holds nothing, take what it held before."""
        for dep in snap.base:
            if dep in snap.stored:
                self.desired[(snap.name, dep)] = snap.base[dep]
            elif (snap.name, dep) in self.desired:
                snap.base[dep] = self.desired[(snap.name, dep)]
        if snap.last_request_at is not None:
            self.activity[snap.name] = snap.last_request_at
        else:
            snap.last_request_at = self.activity.get(snap.name)
        return snap


class PoolSnapshot(msgspec.Struct, kw_only=True):
    name: str
    config: Pool
    base: dict[str, int]  # desired replicas per deployment (Redis, else the pools file)
    stored: list[str] = []  # the deployments whose desired count came from Redis
    last_request_at: float | None
    restart_generation: int
    requests: int
    cold_starts: int
    drains: dict[str, int] = {}  # replica id -> pid an operator asked to drain
    replicas: list[ReplicaInfo]
    now: float
    traffic: dict[str, Traffic] | None = None  # per deployment, when asked for

    def desired(self, deployment: str) -> int:
        return effective_desired(self.base[deployment], self.config, self.last_request_at, self.now)

    @property
    def asleep(self) -> bool:
        return asleep(self.config, self.last_request_at, self.now)

    def status(self) -> PoolStatus:
        deps = [self._deployment(d.name) for d in self.config.deployments]
        return PoolStatus(
            pool=self.name,
            status=_health(deps, self.asleep),
            asleep=self.asleep,
            last_request_at=self.last_request_at,
            requests=self.requests,
            cold_starts=self.cold_starts,
            restart_generation=self.restart_generation,
            deployments=deps,
            replicas=[ReplicaView.of(r) for r in self.replicas],
        )

    def _deployment(self, name: str) -> DeploymentStatus:
        mine = [r for r in self.replicas if r.deployment == name]
        dep = next(d for d in self.config.deployments if d.name == name)
        weights = sum(d.weight for d in self.config.deployments)
        return DeploymentStatus(
            name=name,
            agent_type=dep.agent_type,
            weight=dep.weight,
            share=round(dep.weight / weights, 4) if weights else 0.0,
            desired=self.desired(name),
            configured=self.base[name],
            ready=sum(r.status == "ready" for r in mine),
            starting=sum(r.status == "starting" for r in mine),
            draining=sum(r.status == "draining" for r in mine),
            unhealthy=sum(r.status == "unhealthy" for r in mine),
            recent=self.traffic.get(name) if self.traffic is not None else None,
        )


def _health(deps: list[DeploymentStatus], is_asleep: bool) -> PoolHealth:
    want = sum(d.desired for d in deps)
    ready = sum(min(d.ready, d.desired) for d in deps)
    if want == 0 or (is_asleep and ready >= want):
        return "idle"  # scaled to zero, or shrunk to min_replicas after idle_timeout_s
    if ready >= want:
        return "healthy"
    return "unhealthy" if sum(d.ready for d in deps) == 0 else "degraded"


class DeploymentStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    agent_type: str
    weight: int
    share: float  # its weight over the pool's total weight: the share of new threads it gets
    desired: int  # replicas wanted now (configured, or min_replicas while the pool is idle)
    configured: int  # desired replicas set by `scale` / the admin API, else the pools file
    ready: int
    starting: int
    draining: int
    unhealthy: int
    # what its replicas answered over the last window_s: requests, measured share, latency, errors,
    # tokens (GET /v1/pools/{pool} and `agentpool status POOL`; left out of the pool lists)
    recent: Traffic | None = None


class ReplicaView(msgspec.Struct, kw_only=True):
    id: str
    deployment: str
    status: str
    depth: int
    in_flight: int
    processed: int
    errors: int
    avg_latency_ms: float
    p50_latency_ms: float
    started_at: float
    last_heartbeat: float
    pid: int
    host: str
    warmup_ms: float = 0.0  # process start (or standby slot) to ready
    build_ms: float = 0.0  # the agent's build inside the warm-up: tools connected, factory run
    detail: str = ""  # why the replica is unhealthy

    @classmethod
    def of(cls, r: ReplicaInfo) -> ReplicaView:
        return cls(
            id=r.id,
            deployment=r.deployment,
            status=r.status,
            depth=r.depth,
            in_flight=r.in_flight,
            processed=r.processed,
            errors=r.errors,
            avg_latency_ms=r.avg_latency_ms,
            p50_latency_ms=r.p50_latency_ms,
            started_at=r.started_at,
            last_heartbeat=r.heartbeat_at,
            pid=r.pid,
            host=r.host,
            warmup_ms=r.warmup_ms,
            build_ms=r.build_ms,
            detail=r.detail,
        )


class PoolStatus(msgspec.Struct, kw_only=True):
    pool: str
    status: PoolHealth
    asleep: bool
    last_request_at: float | None
    requests: int
    cold_starts: int
    restart_generation: int
    deployments: list[DeploymentStatus]
    replicas: list[ReplicaView]


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "degraded"]
    total_pools: int
    healthy_pools: int  # healthy or idle (asleep by design)
    active_requests: int  # in flight + queued on live replicas
    total_requests: int  # published since the namespace began
    avg_response_ms: float  # mean of live replicas' average latency, weighted by requests served

    @classmethod
    def of(cls, pools: list[PoolStatus]) -> Health:
        replicas = [r for p in pools for r in p.replicas]
        served = sum(r.processed for r in replicas)
        avg = sum(r.avg_latency_ms * r.processed for r in replicas) / served if served else 0.0
        ok = sum(p.status in ("healthy", "idle") for p in pools)
        return cls(
            status="ok" if ok == len(pools) else "degraded",
            total_pools=len(pools),
            healthy_pools=ok,
            active_requests=sum(r.depth for r in replicas),
            total_requests=sum(p.requests for p in pools),
            avg_response_ms=round(avg, 3),
        )


class Activity:
    """Requests this process published, flushed to Redis once per membership refresh, not per request."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._seen: dict[str, tuple[float, int]] = {}

    def seen(self, pool: str) -> None:
        self._seen[pool] = (time.time(), self._seen.get(pool, (0.0, 0))[1] + 1)

    async def flush(self) -> None:
        if not self._seen:
            return
        batch, self._seen = self._seen, {}
        keys = self.fleet.keys
        pipe = self.fleet.redis.pipeline(transaction=False)
        pipe.zadd(keys.activity, {pool: at for pool, (at, _) in batch.items()}, gt=True)
        for pool, (_, n) in batch.items():
            pipe.hincrby(keys.requests, pool, n)
        await pipe.execute()
