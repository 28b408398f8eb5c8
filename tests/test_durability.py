"""Redis persistence: gateway and supervisor say loudly when a Redis restart would lose state."""

from __future__ import annotations

import logging
from dataclasses import replace

import httpx
import pytest

from agentpool.broker.redis_conn import check_persistence
from tests.conftest import System, running_gateway

pytestmark = pytest.mark.timeout(30)


async def test_a_redis_without_an_append_only_file_is_warned_about(
    make_system, caplog: pytest.LogCaptureFixture
) -> None:
    system: System = await make_system(replicas=1, start=False)
    redis = system.client.redis
    aof = (await redis.config_get("appendonly"))["appendonly"]
    expected = 1 if aof in ("yes", b"yes") else 0
    with caplog.at_level(logging.WARNING, logger="agentpool.redis"):
        gateway = running_gateway(system.settings, system.config)
        async with gateway as url, httpx.AsyncClient(base_url=url) as http:
            scrape = (await http.get("/metrics")).text
    assert f"agentpool_redis_persistence {float(expected)}" in scrape
    warned = [r.getMessage() for r in caplog.records if "append-only file" in r.getMessage()]
    if expected == 0:  # the machine's own Redis (this suite never changes its settings)
        assert warned and "a restart loses thread history, API keys" in warned[0], caplog.text
        assert "deploy/redis/redis.conf" in warned[0]
    else:
        assert not warned


async def test_the_check_reports_what_redis_runs_with(make_system) -> None:
    system: System = await make_system(replicas=1, start=False)
    redis = system.client.redis
    aof = (await redis.config_get("appendonly"))["appendonly"]
    assert await check_persistence(redis, system.settings.redis_url, "test") == (aof in ("yes", b"yes"))


async def test_metrics_can_be_closed_with_a_scrape_token(make_system) -> None:
    system: System = await make_system(replicas=1, start=False)
    closed = replace(system.settings, metrics_token="scrape-secret")
    async with running_gateway(closed, system.config) as url, httpx.AsyncClient(base_url=url) as http:
        latin1 = "Bearer sc\u00e9".encode("latin-1")  # a header byte no str comparison takes
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": latin1}):
            r = await http.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["error_code"] == "INVALID_API_KEY", (headers, r.text)
            assert "agentpool_" not in r.text
        ok = await http.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert ok.status_code == 200 and "agentpool_redis_persistence" in ok.text
