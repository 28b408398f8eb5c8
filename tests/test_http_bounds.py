"""The gateway's HTTP bounds (gateway/guard.py): head size, URL, head timeout, connection cap,
idle keep-alive, the caps on the headers it keeps, 405's Allow, and a client leaving mid-body.

Protocol cases talk to a real gateway over raw sockets; a read that returns b"" (the gateway
closed) is the event they wait on, each under a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aredis

from agentpool.gateway.guard import HEADER_CAPS
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings
from tests.conftest import System, replace, running_gateway, wait_until

pytestmark = pytest.mark.timeout(30)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
GET = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Conn]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def until_closed(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the gateway sends until it closes; fails if it has not closed by ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        return await reader.read()


async def one_response(conn: Conn, request: bytes = GET) -> tuple[int, dict[str, str], bytes]:
    """One request and its Content-Length framed response; the connection stays open."""
    reader, writer = conn
    writer.write(request)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers, _ = parse(head)
        return status, headers, await reader.readexactly(int(headers["content-length"]))


def error_of(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = parse(raw)
    return status, headers, json.loads(body)


async def test_a_head_over_the_cap_is_431_and_the_url_over_its_cap_414(make_system) -> None:
    system: System = await make_system(start=False)
    async with running_gateway(system.settings, system.config) as url:
        async with connect(url) as (reader, writer):
            # Given a 64 KB header
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
            # Then the answer is 431 in the error shape, and the connection closes
            status, headers, body = error_of(await until_closed(reader, 5))
        assert status == 431 and headers["connection"] == "close"
        assert body == {
            "error": "request line and headers over 16384 bytes",
            "error_code": "HEADERS_TOO_LARGE",
            "details": {"limit_bytes": 16384},
        }
        async with connect(url) as conn:  # just under the cap is served, twice on one connection
            for _ in range(2):
                big = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 16000 + b"\r\n\r\n"
                assert (await one_response(conn, big))[0] == 200
        async with connect(url) as (reader, writer):
            writer.write(b"GET /healthz?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
            status, headers, body = error_of(await until_closed(reader, 5))
        assert status == 414 and body["error_code"] == "URI_TOO_LONG", body
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200


async def test_bodies_and_pipelined_requests_past_the_head_cap_are_parsed_as_before(make_system) -> None:
    system: System = await make_system(start=False)
    async with running_gateway(system.settings, system.config) as url, connect(url) as conn:
        # Given a 50 KB body in the same write as its head: only the head counts against the cap
        body = b'{"thread_id": "x"' + b" " * 50_000 + b"}"
        post = b"POST /v1/ask/p HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        post += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        status, _, answer = await one_response(conn, post)
        # Then the whole body was read and judged: it lacks "content"
        assert status == 400 and b"content" in answer, answer
        # And two requests pipelined in one write are both answered
        conn[1].write(GET * 2)
        async with asyncio.timeout(5):
            for _ in range(2):
                status, headers, _ = parse(await conn[0].readuntil(b"\r\n\r\n"))
                await conn[0].readexactly(int(headers["content-length"]))
                assert status == 200
        # And a chunked body of 50 KB chunks is read whole too
        chunked = b"POST /v1/ask/p HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        half = len(body) // 2
        for part in (body[:half], body[half:]):
            chunked += b"%x\r\n%s\r\n" % (len(part), part)
        status, _, answer = await one_response(conn, chunked + b"0\r\n\r\n")
        assert status == 400 and b"content" in answer, answer
    async with running_gateway(system.settings, system.config) as url, connect(url) as (reader, writer):
        # But trailers after a chunked body count like headers: 1 MB of them ends the connection
        writer.write(
            b"POST /v1/ask/p HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        )
        writer.write(b"X-Trailer: " + b"a" * (1 << 20) + b"\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # closed with the trailers unread: a reset
            assert await until_closed(reader, 5) == b""


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


async def _send_huge_head(port: int, payload: memoryview) -> bytes:
    """A raw socket: sock_sendall sends from ``payload`` in place, so the client buffers nothing."""
    loop = asyncio.get_running_loop()
    with socket.socket() as s:
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        with contextlib.suppress(ConnectionError):  # the gateway may stop draining: it has answered
            await loop.sock_sendall(s, payload)
        chunks = []
        while chunk := await loop.sock_recv(s, 65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_megabyte_heads_do_not_grow_the_gateway(make_system) -> None:
    system: System = await make_system(start=False)
    payload = memoryview(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    async with running_gateway(system.settings, system.config) as url:
        port = urlsplit(url).port
        assert port is not None
        _reset_peak_rss()
        before = _kb("VmRSS")
        # When 20 clients send a 1 MB header each, at once
        async with asyncio.timeout(15):
            answers = await asyncio.gather(*(_send_huge_head(port, payload) for _ in range(20)))
        # Then each gets a 431, and the gateway (this process) never held them: its peak barely moved
        assert {parse(a)[0] for a in answers} == {431}
        grown_kb = _kb("VmHWM") - before
        assert grown_kb < 4096, f"peak RSS grew {grown_kb} kB for 20 MB of headers"


async def test_a_trickling_or_silent_client_is_closed_after_the_header_timeout(make_system) -> None:
    system: System = await make_system(start=False)
    settings = replace(system.settings, header_timeout_s=1.0)

    async def trickle(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"X-Slow: 1\r\n")
                await asyncio.sleep(0.1)

    async with running_gateway(settings, system.config) as url:
        async with connect(url) as (slow, slow_w), connect(url) as (silent, _):
            slow_w.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
            t0 = time.monotonic()
            task = asyncio.create_task(trickle(slow_w))
            try:
                # Then the trickler gets a 408 and the gateway closes it within the timeout + 1 s
                status, _, body = error_of(await until_closed(slow, 2.0))
                elapsed = time.monotonic() - t0
            finally:
                task.cancel()
            assert status == 408 and body["error_code"] == "REQUEST_TIMEOUT" and elapsed >= 0.9, elapsed
            # And a connection that never sent a byte is closed without an answer
            assert await until_closed(silent, 1.0) == b""
        async with connect(url) as conn:  # a client that sends its head in time is served
            assert (await one_response(conn))[0] == 200


async def test_connections_over_the_cap_are_refused_until_some_close(make_system) -> None:
    system: System = await make_system(start=False)
    settings = replace(system.settings, max_connections=8)
    async with running_gateway(settings, system.config) as url, contextlib.AsyncExitStack() as stack:
        # Given 8 open connections, each served once and idle in keep-alive
        held = [await stack.enter_async_context(connect(url)) for _ in range(8)]
        for conn in held:
            assert (await one_response(conn))[0] == 200
        # When a 9th connects, it gets a 503 that says to retry, and is closed
        async with connect(url) as (reader, writer):
            writer.write(GET)
            status, headers, body = error_of(await until_closed(reader, 5))
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert body["error_code"] == "TOO_MANY_CONNECTIONS"
        # And once two close, new connections are served again
        for _, writer in held[:2]:
            writer.close()

        async def served() -> bool:
            async with connect(url) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                return parse(await until_closed(reader, 5))[0] == 200

        await wait_until(served, 5, "a new connection served after two closed")
        assert (await one_response(held[-1]))[0] == 200  # the held ones still work


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(make_system) -> None:
    system: System = await make_system(start=False)
    async with (
        running_gateway(replace(system.settings, keepalive_s=1), system.config) as url,
        connect(url) as conn,
    ):
        assert (await one_response(conn))[0] == 200
        t0 = time.monotonic()
        # Then, idle, it is closed after the keep-alive timeout (1 s), not before
        assert await until_closed(conn[0], 2.5) == b""
        assert time.monotonic() - t0 >= 0.9


def test_bounds_are_settings() -> None:
    s = Settings.from_env(
        {
            "AGENTPOOL_MAX_HEADER_BYTES": "32768",
            "AGENTPOOL_HEADER_TIMEOUT_S": "2.5",
            "AGENTPOOL_KEEPALIVE_S": "30",
        }
    )
    assert (s.max_header_bytes, s.header_timeout_s, s.keepalive_s, s.max_connections) == (
        32768,
        2.5,
        30,
        1024,
    )
    for bad in (
        {"AGENTPOOL_MAX_CONNECTIONS": "many"},
        {"AGENTPOOL_MAX_HEADER_BYTES": "100"},
        {"AGENTPOOL_HEADER_TIMEOUT_S": "0"},
        {"AGENTPOOL_MAX_URL_BYTES": "65536"},  # over max_header_bytes: could never apply
    ):
        with pytest.raises(Exception, match=next(iter(bad))):
            Settings.from_env(bad)


async def test_a_405_names_the_allowed_methods(make_system) -> None:
    system: System = await make_system(start=False)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        r = await http.get("/v1/ask/p")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error_code"] == "METHOD_NOT_ALLOWED"
        r = await http.post("/healthz")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"  # sorted: stable


ASK = ("POST", "/v1/ask/p", {"content": "hi"})
CHAT = ("POST", "/v1/chat/completions", {"model": "p", "messages": [{"role": "user", "content": "hi"}]})
WHERE = {"Idempotency-Key": ASK, "X-Thread-ID": CHAT, "X-API-Key": ASK}  # Last-Event-ID and traceparent below


async def test_headers_over_their_caps_are_refused_before_anything_is_queued(make_system) -> None:
    system: System = await make_system(replicas=1)
    names = Names(system.settings.namespace)
    red = aredis.Redis.from_url(system.settings.redis_url)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        assert set(WHERE) | {"Last-Event-ID", "traceparent"} == set(HEADER_CAPS)  # a new cap, a new case
        for header, (method, path, body) in WHERE.items():
            cap, outcome = HEADER_CAPS[header]
            r = await http.request(method, path, json=body, headers={header: "k" * (cap + 1)})
            assert str(r.status_code) == outcome, (header, r.text)
        # Then nothing was published: no request got an owner or a reply stream
        for kind in ("reply", "owner"):
            assert [k async for k in red.scan_iter(match=f"{names.ns}:{kind}:*")] == [], kind
        await red.aclose()
        # A traceparent over its cap or malformed is dropped (W3C: ignored), never stored
        valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        for sent, kept in (
            ("00-" + "a" * 5000, None),
            (valid + "-" + "x" * 200, None),  # version 00 has no more fields
            (valid.upper(), None),
            ("01" + valid[2:-2] + "03-future-field", valid),  # a later version, read as 00
            (valid, valid),
        ):
            r = await http.post(
                "/v1/ask/p", json={"content": "hi", "stream": True}, headers={"traceparent": sent}
            )
            assert r.status_code == 200, r.text
            start = next(
                json.loads(x[6:]) for x in r.text.splitlines() if x.startswith('data: {"type":"start"')
            )
            assert start.get("traceparent") == kept, sent[:80]
        rid = start["request_id"]
        cap, outcome = HEADER_CAPS["Last-Event-ID"]
        r = await http.get(
            f"/v1/requests/{rid}", headers={"Accept": "text/event-stream", "Last-Event-ID": "1" * cap}
        )
        assert str(r.status_code) == outcome and r.json()["details"] == {"header": "Last-Event-ID"}


async def test_a_client_leaving_mid_body_logs_no_error(make_system, caplog: pytest.LogCaptureFixture) -> None:
    system: System = await make_system(start=False)
    caplog.set_level(logging.DEBUG, logger="agentpool.gateway")
    async with running_gateway(system.settings, system.config) as url:
        # Given a client that sends 1 KB of a 100 KB body, then goes away
        async with connect(url) as (_, writer):
            writer.write(
                b"POST /v1/ask/p HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n" + b'{"content": "' + b"a" * 1000
            )
            await writer.drain()

        def gone() -> bool:
            return any("before its body was read" in r.getMessage() for r in caplog.records)

        await wait_until(gone, 5, "the gateway to see the client leave")
        # Then no ERROR (uvicorn's "Exception in ASGI application") was logged, and it serves on
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200
