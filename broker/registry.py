"""Replica membership: heartbeats written by workers, read by routers and status endpoints.

Each pool has one Redis hash ``replicas:{pool}`` mapping replica id -> JSON :class:`ReplicaInfo`.
A replica is live while its ``heartbeat_at`` is younger than ``HEARTBEAT_TTL_S``; readers prune
entries long dead. One ``HGETALL`` per pool gives a router the whole membership in one round trip.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec
import redis.asyncio as aredis

from agentpool.shared.names import Names

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 3.5  # three missed beats and a replica is gone from routing
PRUNE_AFTER_S = 120.0

ReplicaStatus = Literal["starting", "ready", "draining", "unhealthy"]


class ReplicaInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    pool: str
    deployment: str
    status: ReplicaStatus = "starting"
    in_flight: int = 0
    ready: int = 0  # messages waiting in the replica's own queue
    processed: int = 0
    errors: int = 0
    avg_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0  # over the replica's latest requests
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    warmup_ms: float = 0.0
    build_ms: float = 0.0  # building the agent (tools connected, python factory run)
    pid: int = 0
    host: str = ""
    provider: str = ""
    model: str = ""
    detail: str = ""  # why a replica is unhealthy

    @property
    def depth(self) -> int:
        return self.in_flight + self.ready

    def live(self, now: float | None = None) -> bool:
        return (now or time.time()) - self.heartbeat_at < HEARTBEAT_TTL_S


_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(ReplicaInfo)


class Registry:
    def __init__(self, redis: aredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    def _key(self, pool: str) -> str:
        return f"{self.names.ns}:replicas:{pool}"

    async def beat(self, info: ReplicaInfo) -> None:
        info.heartbeat_at = time.time()
        await self.redis.hset(self._key(info.pool), info.id, _ENC.encode(info))

    async def remove(self, pool: str, replica_id: str) -> None:
        await self.redis.hdel(self._key(pool), replica_id)

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        """Every replica that beat recently (any status), pruning long-dead entries."""
        raw = await self.redis.hgetall(self._key(pool))
        now = time.time()
        out, stale = [], []
        for rid, blob in raw.items():
            try:
                info = _DEC.decode(blob)
            except msgspec.DecodeError:
                stale.append(rid)
                continue
            if now - info.heartbeat_at > PRUNE_AFTER_S:
                stale.append(rid)
            elif info.live(now):
                out.append(info)
        if stale:
            await self.redis.hdel(self._key(pool), *stale)
        out.sort(key=lambda r: r.id)
        return out

    async def all_entries(self, pool: str) -> list[ReplicaInfo]:
        """Every entry, live or not (for status pages: shows recently dead replicas too)."""
        raw = await self.redis.hgetall(self._key(pool))
        return sorted((_DEC.decode(b) for b in raw.values()), key=lambda r: r.id)
