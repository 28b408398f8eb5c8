"""Requests-per-minute limits per API key and per pool, shared by every gateway through Redis.

The algorithm is GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp):
each limit stores its theoretical arrival time (TAT). A request is allowed when
``TAT + period/limit - period <= now``; allowing it moves the TAT on by ``period/limit``. It
admits a burst of exactly ``limit`` requests and then one every ``period/limit``, with O(1) state
per limit (one string) instead of a sliding window's per-request log. One Lua script checks all
the limits of a request and charges them only if every one allows it, using Redis's clock so
gateways on hosts with skewed clocks still agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aredis

from agentpool.broker import tenants
from agentpool.broker.redis_conn import translated
from agentpool.gateway.auth import Principal
from agentpool.shared.config import Config, Pool
from agentpool.shared.names import Names

PERIOD_MS = 60_000

# KEYS: one per limit. ARGV[1] = period ms, ARGV[2] = cost (requests charged), ARGV[2+i] = limit i
# (requests per period).
# -> {allowed 0/1, index of the reported limit, remaining, reset ms, retry-after ms}
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local new_tats, worst, worst_i, retry = {}, math.huge, 1, 0
for i = 1, #KEYS do
  local unit = period / tonumber(ARGV[i + 2])
  local inc = unit * cost
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + inc
  local wait = new_tat - period - now
  if wait > 0.001 then
    if wait > retry then retry = wait; worst_i = i end
  end
  new_tats[i] = new_tat
  local left = math.floor((period - (new_tat - now)) / unit + 0.001)
  if retry == 0 and left < worst then worst = left; worst_i = i end
end
if retry > 0 then
  local tat = tonumber(redis.call('GET', KEYS[worst_i]) or '0')
  return {0, worst_i, 0, math.ceil(math.max(tat - now, 0)), math.ceil(retry)}
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tostring(new_tats[i]), 'PX', math.ceil(new_tats[i] - now) + 1000)
end
return {1, worst_i, worst, math.ceil(new_tats[worst_i] - now), 0}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome for the most restrictive limit of a request."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until that limit is fully replenished
    retry_after_s: float

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


def limits_for(
    config: Config, names: Names, principal: Principal, pool_name: str, pool: Pool
) -> list[tuple[str, int]]:
    """(Redis key, requests per minute) of each limit that applies; 0 means unlimited.

    The anonymous caller of an open gateway has no key limit, only pool limits. A per-tenant
    template's limit applies to each tenant's own pool.
    """
    out = []
    if principal.key_id is not None:
        rpm = principal.requests_per_minute
        rpm = config.rate_limit.requests_per_minute if rpm is None else rpm
        if rpm > 0:
            out.append((names.rate("key", principal.key_id), rpm))
    if pool.rate_limit is not None and pool.rate_limit.requests_per_minute > 0:
        ident = tenants.runs_in(pool_name, pool, principal.tenant)
        out.append((names.rate("pool", ident), pool.rate_limit.requests_per_minute))
    return out


class RateLimiter:
    def __init__(self, redis: aredis.Redis, redis_url: str) -> None:
        self._script = redis.register_script(_GCRA)
        self._url = redis_url

    async def check(self, limits: list[tuple[str, int]], cost: int = 1) -> Verdict | None:
        """Charge every limit ``cost`` requests (a fan-out's N runs), or none if one has not that
        many left; None when no limit applies."""
        if not limits:
            return None
        with translated(self._url):
            args = [PERIOD_MS, cost, *(n for _, n in limits)]
            res = await self._script(keys=[k for k, _ in limits], args=args)
        allowed, idx, remaining, reset_ms, retry_ms = (int(x) for x in res)
        return Verdict(
            bool(allowed),
            limits[idx - 1][1],
            max(0, remaining),
            max(0, math.ceil(reset_ms / 1000)),
            retry_ms / 1000,
        )
