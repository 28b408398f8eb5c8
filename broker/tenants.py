"""Per-tenant pools: a pool with ``per_tenant = true`` is a template for ``{pool}--{tenant}`` pools.

A tenant's pool is registered in the sorted set ``tenant_pools`` (name -> created at) by the first
client that needs it; supervisors read the set and start its replicas. ``max_total_pools`` caps
static + per-tenant pools: a new one evicts the per-tenant pool whose last request is oldest among
those idle for their ``idle_timeout_s`` (pools of tenants listed in the config are never evicted),
or is refused with 503 ``POOL_LIMIT``. Registration and eviction are one Lua script, so several
gateways never overshoot the cap.
"""

from __future__ import annotations

import re
import time

import msgspec
import redis.asyncio as aredis

from agentpool.shared.config import Config, Pool
from agentpool.shared.errors import BadRequest, Unavailable
from agentpool.shared.names import Names

SEP = "--"
TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # as API-key tenants (shared/api_config.py)

# KEYS: tenant_pools, activity; ARGV: name, now, cap (0 = none), static count, then candidate
# (name, idle-before) pairs, oldest first -> 1 known, 2 created, 3 created after evicting, 0 refused.
_ENSURE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[1])
  return {1}
end
local cap = tonumber(ARGV[3])
local evicted = false
if cap > 0 and tonumber(ARGV[4]) + redis.call('ZCARD', KEYS[1]) >= cap then
  for i = 5, #ARGV, 2 do
    local last = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]) or '0')
    if redis.call('ZSCORE', KEYS[1], ARGV[i]) and last < tonumber(ARGV[i + 1]) then
      redis.call('ZREM', KEYS[1], ARGV[i])
      redis.call('ZREM', KEYS[2], ARGV[i])
      evicted = ARGV[i]
      break
    end
  end
  if not evicted then return {0} end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[1])
if evicted then return {3, evicted} end
return {2}
"""


def tenant_pool(template: str, tenant: str) -> str:
    if not TENANT.match(tenant):
        raise BadRequest(
            "tenant must be 1-63 characters of a-z 0-9 _ -, starting with a letter or digit",
            error_code="VALIDATION_ERROR",
            details={"field": "tenant"},
        )
    return f"{template}{SEP}{tenant}"


def runs_in(name: str, pool: Pool, tenant: str) -> str:
    """The pool a request of ``tenant`` to pool ``name`` runs in: its own ``{name}--{tenant}`` when
    ``name`` is a per-tenant template, else ``name`` itself."""
    return tenant_pool(name, tenant) if pool.per_tenant else name


def split(name: str) -> tuple[str, str] | None:
    """``(template, tenant)`` for a per-tenant pool name, else None."""
    template, sep, tenant = name.partition(SEP)
    return (template, tenant) if sep and tenant else None


def pool_config(config: Config, name: str) -> Pool | None:
    """The pool's settings: a static pool's own, or for ``{template}--{tenant}`` the template's."""
    if name in config.pools:
        return config.pools[name]
    parts = split(name)
    if parts is None:
        return None
    template = config.pools.get(parts[0])
    if template is None or not template.per_tenant:
        return None
    return msgspec.structs.replace(template, per_tenant=False, tenants=[], tenant=parts[1])


def materialize(config: Config, name: str) -> Config:
    """``config`` with the per-tenant pool ``name`` as an ordinary pool (for its worker processes)."""
    if name in config.pools:
        return config
    pool = pool_config(config, name)
    if pool is None:
        raise KeyError(f"no pool or per-tenant pool template for {name!r}")
    return msgspec.structs.replace(config, pools={**config.pools, name: pool})


def static_pools(config: Config) -> list[str]:
    """Pools that run replicas as configured (templates do not run any themselves)."""
    return [name for name, p in config.pools.items() if not p.per_tenant]


def configured(config: Config) -> list[str]:
    """Per-tenant pools named in the config (``tenants = [...]``): made at start, never evicted."""
    return [tenant_pool(name, t) for name, p in config.pools.items() if p.per_tenant for t in p.tenants]


class TenantPools:
    def __init__(self, redis: aredis.Redis, names: Names, config: Config) -> None:
        self.redis = redis
        self.config = config
        self.key = f"{names.ns}:tenant_pools"
        self.activity_key = f"{names.ns}:activity"
        self._ensure = redis.register_script(_ENSURE)

    async def names(self) -> list[str]:
        members = await self.redis.zrange(self.key, 0, -1)
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    async def ensure(self, name: str, now: float | None = None) -> bool:
        """Register ``name`` (marking it used); True if it is new. Raises 503 POOL_LIMIT at the cap."""
        now = now or time.time()
        cap = self.config.max_total_pools or 0
        args: list[str | float | int] = [name, now, cap, len(static_pools(self.config))]
        if cap:
            args += await self._candidates(now)
        res = await self._ensure(keys=[self.key, self.activity_key], args=args)
        if int(res[0]) == 0:
            raise Unavailable(
                f"pool limit reached: {cap} pools run and none of the per-tenant ones is idle",
                error_code="POOL_LIMIT",
                retry_after_s=30,
                details={"max_total_pools": cap, "pool": name},
            )
        return int(res[0]) >= 2

    async def _candidates(self, now: float) -> list[str | float]:
        """Evictable pools, oldest last request first, each with its idle cut-off time."""
        pinned = set(configured(self.config))
        rows = []
        for name in await self.names():
            pool = pool_config(self.config, name)
            if name in pinned or pool is None:
                continue
            last = await self.redis.zscore(self.activity_key, name) or 0.0
            rows.append((last, name, now - pool.idle_timeout_s))
        rows.sort()
        return [x for _, name, cutoff in rows for x in (name, cutoff)]
