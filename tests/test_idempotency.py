"""Idempotency-Key: a repeat gets the first answer; another body gets 422; keys are per tenant."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import pytest

from agentpool.gateway.idempotency import IDEM_TTL_S, PUBLISH_GRACE_S, Claim, Idempotency, fingerprint
from agentpool.gateway.schemas import AskBody
from tests.api_helpers import h, make_key, receiver, tenant_config
from tests.conftest import System, running_gateway, wait_until

pytestmark = pytest.mark.timeout(60)


def idem(key: str, api_key: str | None = None) -> dict[str, str]:
    return {"Idempotency-Key": key, **(h(api_key) if api_key else {})}


async def test_a_repeat_returns_the_first_answer_and_runs_once(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        body = {"content": "pay once", "thread_id": "t-idem"}
        first = await http.post("/v1/ask/pa", json=body, headers=idem("order-42"))
        assert first.status_code == 200
        # the same body, keys in another order and other whitespace: the same request
        again = await http.post(
            "/v1/ask/pa", content=b'{ "thread_id":"t-idem",  "content":"pay once"}', headers=idem("order-42")
        )
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        sse = await http.post(
            "/v1/ask/pa", json=body, headers={**idem("order-42"), "Accept": "text/event-stream"}
        )
        assert (
            sse.headers["content-type"].startswith("text/event-stream")
            and first.json()["content"] in sse.text
        )
        # the thread got one turn (user + assistant), not three
        assert await system.client.redis.llen(system.client.names.thread("default", "t-idem")) == 2
        # and the result is kept as long as the key (a background step at the request's end)
        reply_key = system.client.names.reply(first.json()["request_id"])

        async def kept() -> bool:
            return IDEM_TTL_S - 60 < await system.client.redis.ttl(reply_key) <= IDEM_TTL_S

        await wait_until(kept, 5, "the reply stream's TTL raised to the key's")


async def test_concurrent_repeats_share_one_request(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}, tokens_per_s=50))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        answers = await asyncio.gather(
            *(http.post("/v1/ask/pa", json={"content": "race"}, headers=idem("same")) for _ in range(4))
        )
        assert {r.status_code for r in answers} == {200}
        assert len({r.json()["request_id"] for r in answers}) == 1


async def test_another_body_with_the_same_key_is_a_conflict(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        first = await http.post("/v1/ask/pa", json={"content": "a"}, headers=idem("k1"))
        r = await http.post("/v1/ask/pa", json={"content": "b"}, headers=idem("k1"))
        assert r.status_code == 422 and r.json()["error_code"] == "IDEMPOTENCY_CONFLICT"
        assert r.json()["details"]["request_id"] == first.json()["request_id"]
        for bad in ("x" * 257, "has space", "tab\there"):
            r = await http.post("/v1/ask/pa", json={"content": "a"}, headers=idem(bad))
            assert r.status_code == 400 and r.json()["details"] == {"header": "Idempotency-Key"}, bad
        assert (
            await http.post("/v1/ask/pa", json={"content": "a"}, headers=idem("x" * 256))
        ).status_code == 200


async def test_keys_are_per_tenant(make_system) -> None:
    system: System = await make_system(config=tenant_config())
    _, ka = await make_key(system, "ta", "ask")
    _, kb = await make_key(system, "tb", "ask")
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        a = await http.post("/v1/ask/pa", json={"content": "x"}, headers=idem("shared-key", ka))
        b = await http.post("/v1/ask/pb", json={"content": "x"}, headers=idem("shared-key", kb))
        assert a.status_code == b.status_code == 200
        assert a.json()["request_id"] != b.json()["request_id"]


async def test_a_webhook_repeat_gets_the_same_202_and_one_delivery(make_system) -> None:
    extra = '[webhooks]\nallow_hosts = ["127.0.0.1"]\n'
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}, extra=extra))
    async with (
        receiver() as rec,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        body = {"content": "hook once", "webhook_url": rec.url}
        first = await http.post("/v1/ask/pa", json=body, headers=idem("w1"))
        again = await http.post("/v1/ask/pa", json=body, headers=idem("w1"))
        assert first.status_code == again.status_code == 202 and first.json() == again.json()
        await rec.wait_for(1)
        await asyncio.sleep(0.5)  # and no second delivery follows
        assert len(rec.deliveries) == 1


async def test_a_request_that_was_not_published_releases_its_key(make_system) -> None:
    # Given a pool whose only replica is full (max_depth 10), so the next request gets 503
    cfg = tenant_config(pools={"pa": "default"}, tokens_per_s=10)
    system: System = await make_system(config=cfg)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        busy = [asyncio.create_task(http.post("/v1/ask/pa", json={"content": f"b{i}"})) for i in range(10)]
        (worker,) = system.workers.values()  # concurrency 4: 4 running + 6 queued fill max_depth

        async def full() -> bool:
            return await worker._ready_count() == 6

        await wait_until(full, 5, "10 requests in the replica")
        r = await http.post("/v1/ask/pa", json={"content": "later"}, headers=idem("retry-me"))
        assert r.status_code == 503 and r.json()["error_code"] == "POOL_SATURATED"
        # refused before publishing: the key is free again, and a retry goes through
        assert not await system.client.redis.exists(system.client.names.idem("default", "retry-me"))
        # and it leaves no owner record behind: only the 10 accepted requests have one
        owners = [k async for k in system.client.redis.scan_iter(match=system.client.names.owner("*"))]
        assert len(owners) == 10, owners
        await asyncio.gather(*busy)
        r2 = await http.post("/v1/ask/pa", json={"content": "later"}, headers=idem("retry-me"))
        assert r2.status_code == 200


async def test_the_promise_outlives_the_gateway_that_accepted_the_request(make_system) -> None:
    """The worker keeps an idempotent result 24 h itself: the accepting gateway may be gone before the
    end, and a repeat after the usual hour still gets the first answer."""
    extra = '[webhooks]\nallow_hosts = ["127.0.0.1"]\n'
    cfg = tenant_config(pools={"pa": "default"}, tokens_per_s=40, extra=extra)
    system: System = await make_system(config=cfg)
    redis, names = system.client.redis, system.client.names
    async with receiver() as rec:
        body = {"content": "once", "webhook_url": rec.url}
        # Given a webhook request accepted by a gateway that stops before the run ends
        gateway = running_gateway(system.settings, system.config)
        async with gateway as url, httpx.AsyncClient(base_url=url) as http:
            accepted = await http.post("/v1/ask/pa", json=body, headers=idem("k-1"))
            assert accepted.status_code == 202, accepted.text
            rid = accepted.json()["request_id"]
        await wait_until(lambda: redis.exists(names.done(rid)), 20, "the run to end with no gateway up")
        # Then its reply is kept as long as the key, not the usual hour
        assert await redis.ttl(names.reply(rid)) > 3600
        # and a repeat on another gateway gets the same request
        gateway = running_gateway(system.settings, system.config)
        async with gateway as url, httpx.AsyncClient(base_url=url) as http:
            again = await http.post("/v1/ask/pa", json=body, headers=idem("k-1"))
    assert again.status_code == 202 and again.json()["request_id"] == rid, again.text
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_repeat_runs_a_first_request_that_was_never_published(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}))
    redis, names = system.client.redis, system.client.names
    body = {"content": "charge once", "thread_id": "t-stale"}
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        # Given a key claimed 4 s ago by a gateway that died before publishing (what it leaves
        # behind), written once this gateway is up, so its start-up does not eat the grace left
        stale = Claim(
            request_id="never-published",
            thread_id="t-stale",
            fingerprint=fingerprint("pa", msgspec.json.decode(msgspec.json.encode(body), type=AskBody)),
            start_by=time.time() + 60,
            claimed_at=time.time() - (PUBLISH_GRACE_S - 1),
        )
        assert await Idempotency(redis, names).claim("default", "order-7", stale) is None
        # When the client repeats the request with the same key
        t0 = time.monotonic()
        r = await http.post("/v1/ask/pa", json=body, headers=idem("order-7"))
        # Then, once the claim's grace is over (~1 s here), it runs as the key's first request
        # (not a QUEUE_TIMEOUT a minute later, nor a 404 for 24 h)
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] != stale.request_id and r.json()["content"]
        assert "idempotent-replayed" not in r.headers and time.monotonic() - t0 >= 0.9
        # and the next repeat gets that answer at once
        again = await http.post("/v1/ask/pa", json=body, headers=idem("order-7"))
        assert again.status_code == 200 and again.json() == r.json()
        assert again.headers["idempotent-replayed"] == "true"
    # the thread got one turn; the stale request is ended (QUEUE_TIMEOUT) and marked cancelled, so
    # a late publish of it would never run
    assert await redis.llen(names.thread("default", "t-stale")) == 2
    ((_id, fields),) = await redis.xrange(names.reply(stale.request_id))
    assert b"QUEUE_TIMEOUT" in fields[b"d"] and await redis.exists(names.cancel(stale.request_id))


async def test_a_repeat_after_a_queue_timeout_runs_again(make_system) -> None:
    # Given a replica busy with 4 slow requests (its concurrency), 1.2 s each
    cfg = tenant_config(pools={"pa": "default"}, tokens_per_s=10)
    system: System = await make_system(config=cfg)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        busy = [asyncio.create_task(http.post("/v1/ask/pa", json={"content": f"b{i}"})) for i in range(4)]
        (worker,) = system.workers.values()
        await wait_until(lambda: len(worker._tasks) == 4, 5, "4 running")
        # When a keyed request waits for an agent no longer than 0.3 s: 504 QUEUE_TIMEOUT
        body = {"content": "book a seat", "max_wait_s": 0.3}
        r = await http.post("/v1/ask/pa", json=body, headers=idem("seat-1"))
        assert r.status_code == 504 and r.json()["error_code"] == "QUEUE_TIMEOUT", r.text
        await asyncio.gather(*busy)
        # Then a repeat with the same key does not get that QUEUE_TIMEOUT again: nothing ran, so it runs
        again = await http.post("/v1/ask/pa", json=body, headers=idem("seat-1"))
        assert again.status_code == 200 and again.json()["content"], again.text
        assert "idempotent-replayed" not in again.headers
        # and the one after gets its answer
        third = await http.post("/v1/ask/pa", json=body, headers=idem("seat-1"))
        assert third.json() == again.json() and third.headers["idempotent-replayed"] == "true"
