"""The dashboard's backend through HTTP: /v1/fleet (history, scoping), its SSE, the /ui files, and
draining one agent (a real supervisor replaces it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentpool.broker.history import BUCKET_S, WINDOW_S
from agentpool.shared.settings import Settings
from tests.api_helpers import h, make_key, tenant_config
from tests.conftest import System, running_gateway, wait_until
from tests.fleet_support import pid_alive, pools_file, ready, supervisors, wait_ready

pytestmark = pytest.mark.timeout(120)

# A history point is an array: [t, rate, p50_ms, p99_ms, error_rate, r503, r429, tokens]
T, RATE, P50, P99, ERROR_RATE, R503, R429, TOKENS = range(8)
ERROR_KEYS = {"error", "error_code", "details"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The gateway as `agentpool gateway` runs it by default: a key is required."""
    return replace(settings, auth="required")


def requests_in(points: list[list[Any]], at: float) -> int:
    """Requests ended over ``points``: a bucket's rate is its count over the time it covers (5 s,
    or the part of the bucket in progress that has passed at ``at``, at least 1 s)."""
    return sum(round(p[RATE] * min(BUCKET_S, max(1.0, at - p[T]))) for p in points)


async def fleet_view(http: httpx.AsyncClient, key: str) -> dict[str, Any]:
    r = await http.get("/v1/fleet", headers=h(key))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()  # type: ignore[no-any-return]


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each SSE message in ``response``."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


async def pool_pa(make_system: Any, rpm: int | None = None) -> tuple[System, str]:
    """Pool pa of tenant ta (one fake replica) and an ask key of ta."""
    system: System = await make_system(config=tenant_config(pools={"pa": "ta"}))
    _, key = await make_key(system, "ta", "ask", rpm=rpm)
    return system, key


@contextlib.asynccontextmanager
async def gateway(system: System) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway on ``system`` and an HTTP client on it."""
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        yield http


async def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (httpx would resolve ``..`` before sending): status, body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- history


async def test_fleet_history_counts_the_answered_requests(make_system) -> None:
    # Given a pool of one fake replica behind the gateway
    system, key = await pool_pa(make_system)
    async with gateway(system) as http:
        # When 5 requests are answered
        for i in range(5):
            r = await http.post("/v1/ask/pa", json={"content": f"hello {i}"}, headers=h(key))
            assert r.status_code == 200, r.text

        # Then once the worker has flushed (once per heartbeat), the pool's history holds 5 requests
        view: dict[str, Any] = {}

        async def flushed() -> bool:
            nonlocal view
            view = await fleet_view(http, key)
            agents = view["pools"][0]["agents"]
            return requests_in(view["history"]["pa"], view["at"]) >= 5 and agents[0]["p50_latency_ms"] > 0

        await wait_until(flushed, 10, "5 requests in the history and a p50 in the heartbeat")
    points = view["history"]["pa"]
    assert requests_in(points, view["at"]) == 5
    assert len(points) == WINDOW_S // BUCKET_S + 1  # the whole window, one point per bucket
    assert [p[T] for p in points] == sorted(p[T] for p in points)
    busy = [p for p in points if p[RATE] > 0]
    assert 1 <= len(busy) <= 2  # 5 quick requests fall in one bucket, or two around a boundary
    assert sum(p[TOKENS] for p in points) > 0
    assert all(p[P50] > 0 and p[P99] >= p[P50] and p[ERROR_RATE] == 0 for p in busy)
    assert sum(p[R503] + p[R429] for p in points) == 0
    assert all(p[TOKENS] == p[P50] == 0 for p in points if p[RATE] == 0)
    # and the pool's view agrees: one ready agent, which processed the 5
    (pool,) = view["pools"]
    assert pool["pool"] == "pa" and pool["tenant"] == "ta" and pool["status"] == "healthy"
    (agent,) = pool["agents"]
    assert agent["processed"] == 5 and agent["errors"] == 0 and agent["p50_latency_ms"] > 0
    assert view["totals"]["processed"] == 5 and view["totals"]["agents_ready"] == 1
    assert view["bucket_s"] == BUCKET_S and view["window_s"] == WINDOW_S


async def test_fleet_history_counts_rate_limit_refusals(make_system) -> None:
    # Given a key allowed one request per minute
    system, key = await pool_pa(make_system, rpm=1)
    async with gateway(system) as http:
        # When it asks twice
        first = await http.post("/v1/ask/pa", json={"content": "one"}, headers=h(key))
        second = await http.post("/v1/ask/pa", json={"content": "two"}, headers=h(key))
        assert first.status_code == 200, first.text
        assert second.status_code == 429 and second.json()["error_code"] == "RATE_LIMIT_EXCEEDED"

        # Then the pool's history shows the refusal (flushed by the gateway) next to the answer
        async def counted() -> bool:
            view = await fleet_view(http, key)
            points = view["history"]["pa"]
            return sum(p[R429] for p in points) >= 1 and requests_in(points, view["at"]) >= 1

        await wait_until(counted, 10, "the 429 and the answered request in the history")
        view = await fleet_view(http, key)  # reading the view is not rate limited
    points = view["history"]["pa"]
    assert sum(p[R429] for p in points) == 1
    assert sum(p[R503] for p in points) == 0
    assert requests_in(points, view["at"]) == 1


async def test_every_gateway_draws_the_same_history(make_system) -> None:
    # Given two gateways in front of one pool
    system, key = await pool_pa(make_system, rpm=3)
    async with gateway(system) as a, gateway(system) as b:
        # When one answers 3 requests and refuses a 4th (429), and the other refuses a 5th
        for i in range(3):
            assert (await a.post("/v1/ask/pa", json={"content": f"q{i}"}, headers=h(key))).status_code == 200
        assert (await a.post("/v1/ask/pa", json={"content": "q3"}, headers=h(key))).status_code == 429
        assert (await b.post("/v1/ask/pa", json={"content": "q4"}, headers=h(key))).status_code == 429

        # Then both show the same counts: they read what every process wrote to Redis
        def counts(view: dict[str, Any]) -> tuple[int, int]:
            points = view["history"]["pa"]
            return requests_in(points, view["at"]), sum(p[R429] for p in points)

        async def both() -> bool:
            return counts(await fleet_view(a, key)) == counts(await fleet_view(b, key)) == (3, 2)

        await wait_until(both, 10, "3 answers and 2 refusals in both gateways' history")


# --- who sees what


async def test_fleet_view_and_admin_api_are_scoped_by_tenant_unless_fleet(make_system) -> None:
    # Given tenants ta and tb with a pool each, and keys of ta: ask, admin, admin + fleet
    system: System = await make_system(config=tenant_config())
    ask_id, ask = await make_key(system, "ta", "ask")
    _, adm = await make_key(system, "ta", "admin")
    fleet_id, ops = await make_key(system, "ta", "admin", "fleet")
    _, fleet_only = await make_key(system, "ta", "fleet")
    async with gateway(system) as http:
        # Then an ask-only key sees its tenant's pool, read-only
        view = await fleet_view(http, ask)
        assert [p["pool"] for p in view["pools"]] == ["pa"] and list(view["history"]) == ["pa"]
        assert view["viewer"] == {
            "tenant": "ta",
            "scopes": ["ask"],
            "key_id": ask_id,
            "fleet_wide": False,
            "can_act": False,
            "auth": "required",
        }
        assert view["totals"]["pools"] == 1
        # an admin key sees the same pool, with the controls, and the admin API lists only it
        view = await fleet_view(http, adm)
        assert [p["pool"] for p in view["pools"]] == ["pa"] and list(view["history"]) == ["pa"]
        assert view["viewer"]["can_act"] is True and view["viewer"]["fleet_wide"] is False
        listed = await http.get("/v1/pools", headers=h(adm))
        assert listed.status_code == 200 and [p["pool"] for p in listed.json()["pools"]] == ["pa"]
        # another tenant's pool looks like no pool, to read or to scale
        assert (await http.get("/v1/pools/pb", headers=h(adm))).json()["error_code"] == "POOL_NOT_FOUND"
        refused = await http.put("/v1/pools/pb/deployments/main", json={"replicas": 2}, headers=h(adm))
        assert refused.status_code == 404 and refused.json()["error_code"] == "POOL_NOT_FOUND", refused.text
        # a key with fleet sees and acts on every tenant's pools
        view = await fleet_view(http, ops)
        assert sorted(p["pool"] for p in view["pools"]) == ["pa", "pb"]
        assert sorted(view["history"]) == ["pa", "pb"]
        assert {p["pool"]: p["tenant"] for p in view["pools"]} == {"pa": "ta", "pb": "tb"}
        assert view["viewer"]["fleet_wide"] is True and view["viewer"]["can_act"] is True
        assert view["viewer"]["key_id"] == fleet_id and view["totals"]["pools"] == 2
        listed = await http.get("/v1/pools", headers=h(ops))
        assert sorted(p["pool"] for p in listed.json()["pools"]) == ["pa", "pb"]
        before = (await http.get("/v1/pools/pb", headers=h(ops))).json()
        assert before["deployments"][0]["configured"] == 1, "the refused PUT changed the pool"
        scaled = await http.put("/v1/pools/pb/deployments/main", json={"replicas": 2}, headers=h(ops))
        assert scaled.status_code == 200, scaled.text
        assert scaled.json() == {"pool": "pb", "deployment": "main", "replicas": 2}
        after = (await http.get("/v1/pools/pb", headers=h(ops))).json()
        assert after["deployments"][0]["configured"] == 2
        # a key holding neither ask nor admin does not read the view
        r = await http.get("/v1/fleet", headers=h(fleet_only))
        assert r.status_code == 403 and r.json()["error_code"] == "FORBIDDEN"

        # And without a key, or with a wrong one: 401 with the JSON error body
        wrong = ask[:-4] + ("AAAA" if not ask.endswith("AAAA") else "BBBB")
        for path in ("/v1/fleet", "/v1/fleet/events", "/v1/pools"):
            for headers in ({}, h(wrong), h("nope")):
                r = await http.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.headers["content-type"].startswith("application/json")
                assert set(r.json()) == ERROR_KEYS and r.json()["error_code"] == "INVALID_API_KEY"


# --- the stream


async def test_fleet_events_stream_a_full_view_then_updates(make_system) -> None:
    # Given a gateway and a key
    system, key = await pool_pa(make_system)
    async with (
        gateway(system) as http,
        http.stream("GET", "/v1/fleet/events", headers=h(key)) as response,
    ):
        # When the dashboard opens the stream
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        events = sse_events(response)
        got = []
        async with asyncio.timeout(10):
            got.append(await anext(events))
        t_first = time.monotonic()
        # Then a second fleet event follows within about 3 s (one a second)
        async with asyncio.timeout(3):
            got.append(await anext(events))
        second_s = time.monotonic() - t_first
    # The first carries the whole window's history, the next only the newest buckets
    assert [kind for kind, _ in got] == ["fleet", "fleet"]
    first, second = (json.loads(data) for _, data in got)
    for view in (first, second):
        assert {"pools", "totals", "history", "viewer", "at"} <= set(view)
        assert [p["pool"] for p in view["pools"]] == ["pa"] and list(view["history"]) == ["pa"]
        assert view["totals"]["agents_ready"] == 1
    assert len(first["history"]["pa"]) == WINDOW_S // BUCKET_S + 1
    assert 1 <= len(second["history"]["pa"]) <= 3
    assert second["at"] > first["at"]
    print(f"\nsecond fleet event {second_s:.2f}s after the first")


async def test_stopping_the_gateway_ends_fleet_streams_at_once(make_system) -> None:
    # Given a dashboard reading the stream
    system, key = await pool_pa(make_system)
    kinds: list[str] = []

    async def read_all(url: str) -> None:
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as http,
            http.stream("GET", "/v1/fleet/events", headers=h(key)) as response,
        ):
            async for kind, _ in sse_events(response):
                kinds.append(kind)

    async with running_gateway(system.settings, system.config) as url:
        reader = asyncio.create_task(read_all(url))
        await wait_until(lambda: len(kinds) >= 2 or reader.done(), 10, "two fleet events")
        assert not reader.done(), reader
        # When the gateway stops (leaving the context)
        t_stop = time.monotonic()
    stop_s = time.monotonic() - t_stop
    # Then the stream ends cleanly, well before uvicorn's 10 s grace for open connections
    await asyncio.wait_for(reader, 5)
    assert stop_s < 5, f"the gateway took {stop_s:.1f}s to stop with a fleet stream open"
    assert set(kinds) == {"fleet"}


# --- the page's files

ASSETS = [
    ("/ui", "text/html"),
    ("/ui/", "text/html"),
    ("/ui/app.js", "text/javascript"),
    ("/ui/app.css", "text/css"),
]


@pytest.mark.parametrize(("path", "kind"), ASSETS)
async def test_ui_files_are_served_with_a_strict_csp_and_an_etag(make_system, path: str, kind: str) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "ta"}), start=False)
    async with gateway(system) as http:
        # When the browser loads the file (no key: the page signs in afterwards)
        r = await http.get(path)
        # Then it comes from the gateway itself, under a CSP that allows nothing else
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(kind) and r.content
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        etag = r.headers["etag"]
        # And a revalidation with its ETag is a 304 without a body
        again = await http.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        stale = await http.get(path, headers={"If-None-Match": '"0000000000000000"'})
        assert stale.status_code == 200 and stale.content == r.content


async def test_ui_serves_only_its_own_files(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "ta"}), start=False)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        # A file it does not have, over httpx: 404 with the JSON error body
        for path in ("/ui/nope.js", "/ui/index.htm", "/ui/.env"):
            r = await http.get(path)
            assert r.status_code == 404, (path, r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert set(r.json()) == ERROR_KEYS and r.json()["error_code"] == "NOT_FOUND"
        # A way out of the directory, sent as written (not resolved by the client): 404, no file
        for target in (
            "/ui/../pyproject.toml",
            "/ui/..%2Fpyproject.toml",
            "/ui/%2e%2e%2fpyproject.toml",
            "/ui/..%5Cpyproject.toml",
            "/ui/%2e%2e",
        ):
            status, body = await raw_get(url, target)
            assert status == 404, (target, status, body[:200])
            assert b"[project]" not in body
            assert set(json.loads(body)) == ERROR_KEYS, (target, body[:200])


# --- draining one agent


async def test_drain_replaces_one_agent_without_losing_capacity(make_system, tmp_path: Path) -> None:
    # Given a pool of 2 replicas run by a real supervisor (worker processes), and an admin key
    path, config = pools_file(tmp_path, replicas=2)
    system: System = await make_system(config, start=False)
    client = system.client
    _, key = await make_key(system, "default", "admin")
    async with (
        supervisors(system.settings, path, config),
        running_gateway(system.settings, config) as url,
        httpx.AsyncClient(base_url=url, timeout=20, headers=h(key)) as http,
    ):
        await wait_ready(client, 2, timeout_s=60)
        before = sorted(await ready(client), key=lambda r: r.id)
        victim = before[0]

        # When one of them is drained through the admin API
        r = await http.post(f"/v1/pools/p/agents/{victim.id}/drain")
        assert r.status_code == 202, r.text
        assert r.json() == {"pool": "p", "agent_id": victim.id, "pid": victim.pid, "draining": True}
        lowest = 2

        # Then its supervisor starts a replacement, and only once that is ready the old one exits
        async def replaced() -> bool:
            nonlocal lowest
            live = await client.registry.replicas("p")
            now = [x for x in live if x.status == "ready"]
            lowest = min(lowest, len(now))
            gone = victim.id not in {x.id for x in live} and victim.pid not in {x.pid for x in live}
            return gone and len(now) == 2 and not pid_alive(victim.pid)

        await wait_until(replaced, 60, f"{victim.id} (pid {victim.pid}) replaced")
        after = sorted(await ready(client), key=lambda r: r.id)
        assert lowest >= 2, f"ready replicas fell to {lowest} during the drain"
        assert before[1].id in {x.id for x in after} and before[1].pid in {x.pid for x in after}
        (new,) = [x for x in after if x.id not in {b.id for b in before}]
        assert new.pid not in {b.pid for b in before}
        # the dashboard's view shows the pool whole again, nothing left draining
        view = await fleet_view(http, key)
        (pool,) = view["pools"]
        assert pool["status"] == "healthy" and pool["deployments"][0]["draining"] == 0
        assert {a["id"] for a in pool["agents"]} == {x.id for x in after}

        # and the drain request is cleared once its process has gone
        async def cleared() -> bool:
            return await client.redis.exists(client.names.drains("p")) == 0

        await wait_until(cleared, 10, "the drain request cleared")

        # And draining an agent the pool does not have (or of a pool there is none) is a 404
        r = await http.post("/v1/pools/p/agents/p-main-99/drain")
        assert r.status_code == 404 and r.json()["error_code"] == "AGENT_NOT_FOUND", r.text
        assert r.json()["details"] == {"pool": "p", "agent_id": "p-main-99"}
        r = await http.post(f"/v1/pools/p/agents/{victim.id}/drain")
        assert r.status_code == 404 and r.json()["error_code"] == "AGENT_NOT_FOUND", r.text
        r = await http.post(f"/v1/pools/nope/agents/{new.id}/drain")
        assert r.status_code == 404 and r.json()["error_code"] == "POOL_NOT_FOUND", r.text
