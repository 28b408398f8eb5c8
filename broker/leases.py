"""Redis leases: which supervisor (or auto replica) owns which replica slot, and pool-wide locks.

A slot is ``(pool, deployment, n)``; its lease is the key ``lease:{pool}:{deployment}:{n}`` holding
the owner's id, with a TTL the owner renews (a Lua compare-and-set, so nobody renews what it lost).
``claim`` takes the lowest free slot number only while fewer than ``limit`` slots of the deployment
are active, in one script, so several supervisors never run more than the desired count and replica
ids stay unique. A slot being drained is marked retiring (value ``owner!``): it keeps its number
until its process exits but no longer counts against the desired replicas.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable

import redis.asyncio as aredis

from agentpool.shared.names import Names

LEASE_TTL_MS = 3000  # a dead owner's slots are free after this long
MAX_SLOTS = 128  # slot numbers a deployment may use by default (its max_replicas is half of it)
RETIRING = "!"

# KEYS: every slot key 1..MAX_SLOTS; ARGV: owner, limit, ttl_ms -> claimed slot number or 0.
_CLAIM = """
local active, free = 0, 0
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if not v then
    if free == 0 then free = i end
  elseif string.sub(v, -1) ~= '!' then
    active = active + 1
  end
end
if active >= tonumber(ARGV[2]) or free == 0 then return 0 end
redis.call('SET', KEYS[free], ARGV[1], 'PX', ARGV[3])
return free
"""

# KEYS: the lease; ARGV: owner, ttl_ms, value to set if the key lapsed (e.g. Redis was away)
# -> 1 if renewed or re-taken, 0 if another owner holds it.
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == ARGV[1] .. '!' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lease, then every slot key; ARGV: owner, limit -> 1 if marked retiring, else 0.
_RETIRE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local active = 0
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, -1) ~= '!' then active = active + 1 end
end
if active <= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '!', 'KEEPTTL')
return 1
"""

# KEYS: the lease; ARGV: owner -> 1 if deleted.
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == ARGV[1] .. '!' then return redis.call('DEL', KEYS[1]) end
return 0
"""


def slot_count(max_replicas: int) -> int:
    """Slot numbers for a deployment of at most ``max_replicas``: twice that (room for the replicas
    draining while their replacements start), and never fewer than the default."""
    return max(MAX_SLOTS, 2 * max_replicas)


def new_owner_id(kind: str = "sup") -> str:
    """A unique owner id that also says where the owner runs (for status pages and debugging)."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Leases:
    """Slot leases and named locks for one owner."""

    def __init__(
        self,
        redis: aredis.Redis,
        names: Names,
        owner: str,
        ttl_ms: int = LEASE_TTL_MS,
        slots: Callable[[str, str], int] | None = None,
    ) -> None:
        self.redis = redis
        self.slots = slots or (lambda pool, deployment: MAX_SLOTS)  # slot numbers of a deployment
        self.ns = names.ns
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._retire = redis.register_script(_RETIRE)
        self._release = redis.register_script(_RELEASE)

    def key(self, pool: str, deployment: str, n: int) -> str:
        return f"{self.ns}:lease:{pool}:{deployment}:{n}"

    def _slots(self, pool: str, deployment: str) -> list[str]:
        return [self.key(pool, deployment, n) for n in range(1, self.slots(pool, deployment) + 1)]

    async def claim(self, pool: str, deployment: str, limit: int) -> int | None:
        """The lowest free slot, if fewer than ``limit`` slots are active; else None."""
        n = await self._claim(keys=self._slots(pool, deployment), args=[self.owner, limit, self.ttl_ms])
        return int(n) or None

    async def renew(self, pool: str, deployment: str, n: int, retiring: bool = False) -> bool:
        """Extend our lease (re-taking it if it lapsed unclaimed); False if another owner has it."""
        value = self.owner + RETIRING if retiring else self.owner
        keys = [self.key(pool, deployment, n)]
        return bool(await self._renew(keys=keys, args=[self.owner, self.ttl_ms, value]))

    async def retire(self, pool: str, deployment: str, n: int, limit: int) -> bool:
        """Mark our slot retiring, only while more than ``limit`` slots are active (never undershoot)."""
        keys = [self.key(pool, deployment, n), *self._slots(pool, deployment)]
        return bool(await self._retire(keys=keys, args=[self.owner, limit]))

    async def release(self, pool: str, deployment: str, n: int) -> None:
        await self._release(keys=[self.key(pool, deployment, n)], args=[self.owner])

    async def holders(self, pool: str, deployment: str) -> dict[int, str]:
        """Slot number -> owner value (``owner!`` while retiring), for every held slot."""
        values = await self.redis.mget(self._slots(pool, deployment))
        return {i: v.decode() if isinstance(v, bytes) else v for i, v in enumerate(values, 1) if v}

    # --- named locks (e.g. one rolling-restart step per pool), same compare-and-set rules
    def lock_key(self, name: str) -> str:
        return f"{self.ns}:lock:{name}"

    async def lock(self, name: str) -> bool:
        return bool(await self.redis.set(self.lock_key(name), self.owner, nx=True, px=self.ttl_ms))

    async def relock(self, name: str) -> bool:
        return bool(await self._renew(keys=[self.lock_key(name)], args=[self.owner, self.ttl_ms, self.owner]))

    async def unlock(self, name: str) -> None:
        await self._release(keys=[self.lock_key(name)], args=[self.owner])

    async def locked(self, name: str) -> bool:
        return bool(await self.redis.exists(self.lock_key(name)))


class Peers:
    """Live supervisors per pool (a sorted set: owner -> expiry), so each claims a fair share."""

    def __init__(self, redis: aredis.Redis, names: Names, owner: str, ttl_ms: int = LEASE_TTL_MS) -> None:
        self.redis = redis
        self.ns = names.ns
        self.owner = owner
        self.ttl_ms = ttl_ms

    def key(self, pool: str) -> str:
        return f"{self.ns}:supervisors:{pool}"

    async def beat(self, pools: list[str], now_ms: int) -> dict[str, int]:
        """Say we are alive for ``pools``; returns the live supervisor count per pool (us included)."""
        pipe = self.redis.pipeline(transaction=False)
        for pool in pools:
            pipe.zadd(self.key(pool), {self.owner: now_ms + self.ttl_ms})
            pipe.zremrangebyscore(self.key(pool), "-inf", now_ms)
            pipe.zcard(self.key(pool))
        res = await pipe.execute()
        return {pool: max(1, int(res[3 * i + 2])) for i, pool in enumerate(pools)}

    async def leave(self, pools: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for pool in pools:
            pipe.zrem(self.key(pool), self.owner)
        await pipe.execute()
