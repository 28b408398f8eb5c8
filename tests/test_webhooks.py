"""Webhooks: 202 then a signed POST, retried with backoff, surviving a gateway restart, SSRF-safe."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from agentpool.gateway.webhooks import verify
from agentpool.shared.config import Config
from tests.api_helpers import Receiver, receiver, tenant_config
from tests.conftest import System, running_gateway, wait_until

pytestmark = pytest.mark.timeout(60)

WEBHOOKS = """
[webhooks]
allow_hosts = ["127.0.0.1"]
retry_base_s = 0.2
max_attempts = 5
timeout_s = 2
"""


def config(**kw: object) -> Config:
    return tenant_config(pools={"pa": "default"}, extra=WEBHOOKS, **kw)  # type: ignore[arg-type]


async def _ask(
    http: httpx.AsyncClient, rec: Receiver, content: str = "hook me", **body: object
) -> dict[str, str]:
    r = await http.post("/v1/ask/pa", json={"content": content, "webhook_url": rec.url, **body})
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"request_id", "thread_id"}
    assert r.headers["location"] == f"/v1/requests/{r.json()['request_id']}"
    return r.json()  # type: ignore[no-any-return]


async def test_result_is_posted_with_a_valid_signature(make_system) -> None:
    system: System = await make_system(config=config())
    async with (
        receiver() as rec,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        ids = await _ask(http, rec)
        await rec.wait_for(1)
        secret = (await http.get("/v1/webhooks/secret")).json()["secret"]
        d = rec.deliveries[0]
        ts, sig = d.headers["x-webhook-timestamp"], d.headers["x-webhook-signature"]
        assert abs(int(ts) - time.time()) < 30
        assert verify(secret, d.body, ts, sig)
        assert not verify(secret, d.body + b" ", ts, sig)
        assert not verify(secret, d.body, str(int(ts) + 1), sig)  # the timestamp is signed too
        assert (
            d.headers["x-request-id"] == ids["request_id"] and d.headers["content-type"] == "application/json"
        )
        payload = json.loads(d.body)
        assert payload["status"] == "completed" and payload["error"] is None
        assert payload["request_id"] == ids["request_id"] and payload["thread_id"] == ids["thread_id"]
        assert payload["content"].startswith("[0 earlier] Re: hook me")
        assert payload["usage"]["output_tokens"] > 0 and payload["timings"]["total_ms"] > 0
        # the result is also readable by id
        assert (await http.get(f"/v1/requests/{ids['request_id']}")).json()["content"] == payload["content"]
        await asyncio.sleep(0.5)  # and no second delivery follows
        assert len(rec.deliveries) == 1


async def test_retried_on_500_then_delivered(make_system) -> None:
    system: System = await make_system(config=config())
    async with (
        receiver([500, 502, 200]) as rec,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await _ask(http, rec)
        await rec.wait_for(3)
        await asyncio.sleep(0.6)  # and no fourth attempt follows
        assert [d.headers["x-webhook-attempt"] for d in rec.deliveries] == ["1", "2", "3"]
        assert len({d.body for d in rec.deliveries}) == 1  # the same signed body every time
        assert not await system.client.redis.exists(system.client.names.webhooks_due())


async def test_a_failed_request_is_delivered_as_failed(make_system) -> None:
    system: System = await make_system(config=config(replicas=0))  # nobody will start it
    async with (
        receiver() as rec,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await _ask(http, rec, max_wait_s=0.3)
        await rec.wait_for(1)
        payload = json.loads(rec.deliveries[0].body)
        assert payload["status"] == "failed" and payload["error"]["error_code"] == "QUEUE_TIMEOUT"


async def test_a_pending_delivery_survives_a_gateway_restart(make_system) -> None:
    system: System = await make_system(config=config())
    async with receiver([503]) as rec:
        # Given a delivery that keeps failing while the first gateway runs
        async with (
            running_gateway(system.settings, system.config) as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            ids = await _ask(http, rec)
            await rec.wait_for(1)
        # When the gateway is gone and the receiver recovers
        rec.statuses = [200]
        failed_before = len(rec.deliveries)
        assert await system.client.redis.zscore(system.client.names.webhooks_due(), ids["request_id"])
        # Then a new gateway delivers it, once
        async with running_gateway(system.settings, system.config):
            await rec.wait_for(failed_before + 1)
            await asyncio.sleep(0.5)  # and no second delivery follows
        ok = rec.deliveries[failed_before:]
        assert len(ok) == 1 and ok[0].headers["x-request-id"] == ids["request_id"]
        assert json.loads(ok[0].body)["status"] == "completed"


async def test_a_request_running_during_a_restart_is_still_delivered(make_system) -> None:
    system: System = await make_system(config=config(tokens_per_s=8))  # 12 tokens: ~1.5 s
    async with receiver() as rec:
        async with (
            running_gateway(system.settings, system.config) as url,
            httpx.AsyncClient(base_url=url) as http,
        ):
            ids = await _ask(http, rec)
        # the accepting gateway stopped before the end: another one finds it (after WATCH_FALLBACK_S)
        async with running_gateway(system.settings, system.config):
            await rec.wait_for(1, timeout_s=30)
        assert json.loads(rec.deliveries[0].body)["request_id"] == ids["request_id"]


async def test_two_gateways_never_both_deliver(make_system) -> None:
    system: System = await make_system(config=config())
    async with (
        receiver() as rec,
        running_gateway(system.settings, system.config) as one,
        running_gateway(system.settings, system.config) as two,
        httpx.AsyncClient() as http,
    ):
        for i in range(8):
            r = await http.post(
                f"{(one, two)[i % 2]}/v1/ask/pa", json={"content": f"c{i}", "webhook_url": rec.url}
            )
            assert r.status_code == 202
        await rec.wait_for(8)
        await asyncio.sleep(1.0)  # and no duplicate follows from the other gateway
        ids = [d.headers["x-request-id"] for d in rec.deliveries]
        assert len(ids) == len(set(ids)) == 8


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://192.168.0.10/x",
        "http://172.16.5.4/",
        "http://169.254.169.254/latest",
        "http://localhost/x",
        "http://[::1]/x",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://[::ffff:10.0.0.1]/",
        "http://user:pw@127.0.0.1/",
    ],
)
async def test_private_and_bad_urls_are_refused(make_system, url: str) -> None:
    system: System = await make_system(config=config(), start=False)
    async with running_gateway(system.settings, system.config) as gw, httpx.AsyncClient(base_url=gw) as http:
        r = await http.post("/v1/ask/pa", json={"content": "x", "webhook_url": url})
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "WEBHOOK_URL_REFUSED"
        assert not await system.client.redis.exists(system.client.names.webhooks_due())
        for bad in ("ftp://127.0.0.1/x", "not a url"):
            r = await http.post("/v1/ask/pa", json={"content": "x", "webhook_url": bad})
            assert r.status_code == 400 and r.json()["error_code"] == "VALIDATION_ERROR"
        r = await http.post(
            "/v1/ask/pa", json={"content": "x", "webhook_url": "http://127.0.0.1/x", "stream": True}
        )
        assert r.status_code == 400 and r.json()["details"] == {"field": "stream"}


async def test_deliveries_wait_for_the_due_time(make_system) -> None:
    """wait_until sanity for the loop: nothing is delivered before a result exists."""
    system: System = await make_system(config=config(tokens_per_s=20))
    async with (
        receiver() as rec,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        await _ask(http, rec)
        await asyncio.sleep(0.2)  # nothing is delivered while the request runs
        assert rec.deliveries == []
        await wait_until(lambda: len(rec.deliveries) == 1, 10, "the delivery after the end")
