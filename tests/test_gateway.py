"""The HTTP gateway: JSON and SSE answers, health, and bad input as clear 4xx errors."""

from __future__ import annotations

import asyncio
import collections

import httpx
import pytest

from tests.conftest import System, running_gateway

pytestmark = pytest.mark.timeout(60)


def parse_sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        ev: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            ev[key] = value
        if ev:
            events.append(ev)
    return events


async def test_json_answer(make_system) -> None:
    system: System = await make_system(replicas=2)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        r = await http.post("/v1/ask/p", json={"content": "hello"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) >= {
            "request_id",
            "thread_id",
            "agent_id",
            "content",
            "usage",
            "timings",
            "created_at",
        }
        assert body["content"].startswith("[0 earlier] Re: hello")
        assert r.headers["x-request-id"] == body["request_id"]
        # the answer stays readable by id
        again = await http.get(f"/v1/requests/{body['request_id']}")
        assert again.status_code == 200 and again.json()["content"] == body["content"]


async def test_sse_streams_chunks_with_stream_ids(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=500, reply_tokens=20)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        r = await http.post(
            "/v1/ask/p", json={"content": "stream me"}, headers={"Accept": "text/event-stream"}
        )
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        events = parse_sse(r.text)
        kinds = [e["event"] for e in events]
        assert kinds[0] == "start" and kinds[-1] == "end"
        assert kinds.count("chunk") >= 10
        assert all("-" in e["id"] for e in events)  # Redis stream entry ids
        # "stream": true in the body does the same
        r2 = await http.post("/v1/ask/p", json={"content": "again", "stream": True})
        assert parse_sse(r2.text)[-1]["event"] == "end"


async def test_health_and_readiness(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["dependencies"] == {"rabbitmq": True, "redis": True}


BAD_REQUESTS = [
    # (description, path, kwargs, status, error_code)
    ("empty body", "/v1/ask/p", {"content": b""}, 400, "INVALID_JSON"),
    ("not json", "/v1/ask/p", {"content": b"{nope"}, 400, "INVALID_JSON"),
    ("json array", "/v1/ask/p", {"content": b"[1,2]"}, 400, "VALIDATION_ERROR"),
    ("missing content", "/v1/ask/p", {"json": {"thread_id": "x"}}, 400, "VALIDATION_ERROR"),
    ("content not a string", "/v1/ask/p", {"json": {"content": 5}}, 400, "VALIDATION_ERROR"),
    ("empty content", "/v1/ask/p", {"json": {"content": ""}}, 400, "VALIDATION_ERROR"),
    ("content too long", "/v1/ask/p", {"json": {"content": "x" * 10_001}}, 400, "VALIDATION_ERROR"),
    (
        "bad thread id",
        "/v1/ask/p",
        {"json": {"content": "hi", "thread_id": "a b/c"}},
        400,
        "VALIDATION_ERROR",
    ),
    ("unknown field", "/v1/ask/p", {"json": {"content": "hi", "colour": "red"}}, 400, "VALIDATION_ERROR"),
    (
        "negative max_wait_s",
        "/v1/ask/p",
        {"json": {"content": "hi", "max_wait_s": -1}},
        400,
        "VALIDATION_ERROR",
    ),
    (
        "bad variable name",
        "/v1/ask/p",
        {"json": {"content": "hi", "context_variables": {"lower": "x"}}},
        400,
        "VALIDATION_ERROR",
    ),
    (
        "oversized body",
        "/v1/ask/p",
        {"content": b'{"content":"' + b"x" * 300_000 + b'"}'},
        413,
        "PAYLOAD_TOO_LARGE",
    ),
    ("invalid utf-8", "/v1/ask/p", {"content": b'{"content":"\xff\xfe"}'}, 400, "INVALID_JSON"),
    ("unknown pool", "/v1/ask/nope", {"json": {"content": "hi"}}, 404, "POOL_NOT_FOUND"),
    ("unknown route", "/v2/whatever", {"json": {}}, 404, "NOT_FOUND"),
]


FIELDS = {
    "bad thread id": "thread_id",
    "negative max_wait_s": "max_wait_s",
    "bad variable name": "context_variables",
}


async def test_bad_input_gets_clear_4xx_and_nothing_breaks(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for what, path, kwargs, status, code in BAD_REQUESTS:
            r = await http.post(path, headers={"content-type": "application/json"}, **kwargs)
            assert r.status_code == status, (what, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error", "error_code", "details"}, what
            assert body["error_code"] == code, (what, body)
            if what in FIELDS:  # the body names the field at fault
                assert body["details"]["field"] == FIELDS[what], (what, body)
        wrong_method = await http.get("/v1/ask/p")
        assert wrong_method.status_code == 405 and wrong_method.json()["error_code"] == "METHOD_NOT_ALLOWED"
        missing = await http.get("/v1/requests/does-not-exist")
        assert missing.status_code == 404 and missing.json()["error_code"] == "REQUEST_NOT_FOUND"
        # and the gateway still answers normally afterwards
        ok = await http.post("/v1/ask/p", json={"content": "still fine?"})
        assert ok.status_code == 200


async def test_a_burst_wider_than_the_redis_pool_gets_answers_not_500s(make_system) -> None:
    """256 asks at once through one gateway: more Redis commands in flight than its pool holds."""
    system: System = await make_system(replicas=2, concurrency=16, max_depth=200)
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http,
    ):
        # When 256 clients ask at the same moment
        replies = await asyncio.gather(
            *(http.post("/v1/ask/p", json={"content": f"burst {i}"}) for i in range(256))
        )
        codes = collections.Counter(r.status_code for r in replies)
        # Then each gets an answer, or a clear 503 from a full pool; never a 500
        assert set(codes) <= {200, 503}, codes
        assert codes[200] >= 128, codes
        for r in replies:
            if r.status_code == 503:
                assert r.json()["error_code"] == "POOL_SATURATED", r.text
