"""Rate limits: GCRA in Redis, shared by gateways, per key and per pool, with headers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agentpool.gateway.ratelimit import RateLimiter
from tests.api_helpers import h, make_key, tenant_config
from tests.conftest import System, running_gateway

pytestmark = pytest.mark.timeout(60)
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


async def _burst(urls: list[str], n: int, headers: dict[str, str], pool: str = "pa") -> list[httpx.Response]:
    """``n`` asks at once, spread over the gateways at ``urls``."""
    async with httpx.AsyncClient(timeout=30) as http:
        return list(
            await asyncio.gather(
                *(
                    http.post(
                        f"{urls[i % len(urls)]}/v1/ask/{pool}", json={"content": f"n{i}"}, headers=headers
                    )
                    for i in range(n)
                )
            )
        )


async def test_two_gateways_share_one_pool_limit_exactly(make_system) -> None:
    # Given a pool limited to 5 requests per minute and two gateway processes
    cfg = tenant_config(pools={"pa": "default"}, pool_extra="rate_limit = { requests_per_minute = 5 }")
    system: System = await make_system(config=cfg)
    async with running_gateway(system.settings, cfg) as one, running_gateway(system.settings, cfg) as two:
        # When 12 requests arrive at once through both
        answers = await _burst([one, two], 12, {})
    # Then exactly the limit passes, the rest get 429 with Retry-After, and all carry the headers
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 5 + [429] * 7, codes
    for r in answers:
        assert all(name in r.headers for name in RATE_HEADERS), r.headers
        assert r.headers["x-ratelimit-limit"] == "5"
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.json()["error_code"] == "RATE_LIMIT_EXCEEDED" for r in refused)
    assert all(r.headers["x-ratelimit-remaining"] == "0" for r in refused)
    # GCRA: the next slot frees after period/limit = 12 s
    assert all(1 <= int(r.headers["retry-after"]) <= 12 for r in refused)
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in answers if r.status_code == 200)
    assert remaining == [0, 1, 2, 3, 4]


async def test_per_key_limit_and_headers_count_down(make_system) -> None:
    system: System = await make_system(config=tenant_config())
    _, slow = await make_key(system, "ta", "ask", rpm=3)
    _, other = await make_key(system, "ta", "ask")  # the default per-key limit (600/min)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        seen = []
        for _ in range(4):
            r = await http.post("/v1/ask/pa", json={"content": "hi"}, headers=h(slow))
            seen.append((r.status_code, r.headers["x-ratelimit-remaining"], r.headers["x-ratelimit-limit"]))
        assert seen == [(200, "2", "3"), (200, "1", "3"), (200, "0", "3"), (429, "0", "3")]
        # another key of the same tenant is not affected
        r = await http.post("/v1/ask/pa", json={"content": "hi"}, headers=h(other))
        assert r.status_code == 200 and r.headers["x-ratelimit-limit"] == "600"
        assert 0 < int(r.headers["x-ratelimit-reset"]) <= 1
        # errors after the limit check carry the headers too
        bad = await http.post("/v1/ask/pa", json={"content": ""}, headers=h(other))
        assert bad.status_code == 400 and bad.headers["x-ratelimit-remaining"] == "598"


async def test_a_refused_request_charges_no_limit(make_system) -> None:
    system: System = await make_system(config=tenant_config(), start=False)
    limiter = RateLimiter(system.client.redis, system.settings.redis_url)
    key, pool = system.client.names.rate("key", "k1"), system.client.names.rate("pool", "pa")
    first = await limiter.check([(key, 1), (pool, 3)])
    assert first is not None and first.allowed and (first.limit, first.remaining) == (1, 0)
    # the key is exhausted: refused, and the pool keeps its 2 remaining requests
    refused = await limiter.check([(key, 1), (pool, 3)])
    assert refused is not None and not refused.allowed and refused.limit == 1
    assert 59 <= refused.retry_after_s <= 60
    pool_only = await limiter.check([(pool, 3)])
    assert pool_only is not None and pool_only.allowed and pool_only.remaining == 1
    assert await limiter.check([]) is None
