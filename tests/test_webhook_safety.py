"""Webhook hardening: a slow receiver stalls nobody, URLs and addresses are checked strictly, the
connection goes to the address that was checked, signatures carry a timestamp, secrets survive
a Redis that lost its data."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentpool.gateway import webhooks
from agentpool.gateway.urlcheck import check_webhook_url, parse_webhook_url, refusal
from agentpool.gateway.webhooks import Deliverer, configured_secret, sign, tenant_secret, verify
from agentpool.shared.api_config import Webhooks
from agentpool.shared.config import Config
from agentpool.shared.errors import ConfigError, WebhookRefused
from agentpool.shared.tasks import cancel_and_wait
from tests.api_helpers import tenant_config
from tests.conftest import System, running_gateway, wait_until

pytestmark = pytest.mark.timeout(30)

PINNED = "hooks.pinned.test"  # .test never resolves for real: only the fake resolver answers it


def config(timeout_s: float = 3, allow: tuple[str, ...] = ("127.0.0.1",), replicas: int = 1) -> Config:
    extra = f"""
[webhooks]
allow_hosts = {list(allow)!r}
retry_base_s = 0.2
max_attempts = 5
timeout_s = {timeout_s}
""".replace("'", '"')
    return tenant_config(pools={"pa": "default"}, extra=extra, replicas=replicas)


@dataclass
class Conn:
    """One connection to :class:`RawHook`, and the request it carried."""

    path: str
    headers: dict[str, str]
    body: bytes
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None


class RawHook:
    """A webhook receiver on a bare asyncio server (optionally TLS). ``/slow`` sends its headers,
    then one body byte every ``trickle_s`` and never finishes; any other path answers 200 at once.
    Counts the connections open per request id, and the highest count seen."""

    def __init__(self, trickle_s: float = 2.0, tls: ssl.SSLContext | None = None) -> None:
        self.trickle_s = trickle_s
        self.tls = tls
        self.conns: list[Conn] = []
        self.open: Counter[str] = Counter()
        self.max_open: Counter[str] = Counter()
        self.port = 0
        self._handlers: set[asyncio.Task[Any]] = set()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def of(self, request_id: str) -> list[Conn]:
        return [c for c in self.conns if c.headers.get("x-request-id") == request_id]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        rid = ""
        conn = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            lines = [line.split(":", 1) for line in head[1:] if line]
            headers = {k.strip().lower(): v.strip() for k, v in lines}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            conn = Conn(head[0].split(" ")[1], headers, body)
            rid = headers.get("x-request-id", "")
            self.conns.append(conn)
            self.open[rid] += 1
            self.max_open[rid] = max(self.max_open[rid], self.open[rid])
            if conn.path == "/slow":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n")
                hung_up = asyncio.create_task(reader.read(1))  # b"" once the gateway gives up
                while not hung_up.done():
                    writer.write(b".")
                    await writer.drain()
                    await asyncio.wait([hung_up], timeout=self.trickle_s)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            if conn is not None:
                conn.closed = time.monotonic()
                self.open[rid] -= 1
            writer.close()
            self._handlers.discard(task)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[RawHook]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()


async def ask(http: httpx.AsyncClient, url: str) -> str:
    r = await http.post("/v1/ask/pa", json={"content": "hook me", "webhook_url": url})
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"])


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: Callable[[int], str]) -> list[str]:
    """Answer lookups of :data:`PINNED` with ``answers(n)`` for the n-th one (others go to the OS);
    returns the list of answers given, one per lookup."""
    real = socket.getaddrinfo
    given: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host != PINNED:
            return real(host, port, *args, **kw)
        given.append(answers(len(given)))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (given[-1], int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return given


# --- (a) a slow receiver


async def test_a_slow_receiver_delays_no_other_delivery(make_system) -> None:
    system: System = await make_system(config=config(timeout_s=3))
    async with (
        RawHook().serving() as hook,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        # Given a receiver that answers 200 and then trickles its body, one byte every 2 s
        slow = await ask(http, hook.url("/slow"))
        await wait_until(lambda: hook.open[slow] == 1, 10, "the slow delivery in flight")
        # When other deliveries fall due meanwhile
        fast = [await ask(http, hook.url("/fast")) for _ in range(3)]
        answered = lambda: all(hook.of(f) and hook.of(f)[0].closed for f in fast)  # noqa: E731
        await wait_until(answered, 10, "the other deliveries")
        # Then they are delivered, once each, while the slow attempt is still running
        assert all(len(hook.of(f)) == 1 for f in fast)
        first = hook.of(slow)[0]
        done = max(c.closed or 0 for f in fast for c in hook.of(f))
        assert first.closed is None or first.closed > done
        # And the slow attempt is abandoned at its 3 s deadline and retried with backoff
        await wait_until(lambda: len(hook.of(slow)) >= 2, 10, "the slow delivery's second attempt")
        # (measured from when the body arrived, so a little under 3 s; a busy machine adds lag)
        assert first.closed is not None and 2.0 <= first.closed - first.opened <= 4.5
        assert [c.headers["x-webhook-attempt"] for c in hook.of(slow)[:2]] == ["1", "2"]


async def test_a_slow_delivery_is_never_in_flight_twice(make_system, monkeypatch) -> None:
    # a lease of 1 s would run out three times during one 3 s attempt: only its renewal holds it
    monkeypatch.setattr(webhooks, "LEASE_S", 1.0)
    system: System = await make_system(config=config(timeout_s=3))
    redis, due = system.client.redis, system.client.names.webhooks_due()
    lapses: list[float] = []

    async def watch_the_lease(request_id: str) -> None:
        """Note each moment an attempt is in flight while its due time (the lease) lies in the past."""
        while True:
            score = await redis.zscore(due, request_id)
            if hook.open[request_id] and score is not None and score < time.time() * 1000:
                lapses.append(score)
            await asyncio.sleep(0.05)

    async with (
        RawHook().serving() as hook,
        running_gateway(system.settings, system.config) as one,
        running_gateway(system.settings, system.config),
        httpx.AsyncClient(base_url=one) as http,
    ):
        slow = await ask(http, hook.url("/slow"))
        watcher = asyncio.create_task(watch_the_lease(slow))
        try:
            await wait_until(
                lambda: len(hook.of(slow)) >= 2 and hook.of(slow)[1].closed is not None,
                15,
                "two whole attempts of the slow delivery",
            )
        finally:
            await cancel_and_wait([watcher])
        assert hook.max_open[slow] == 1
        assert [c.headers["x-webhook-attempt"] for c in hook.of(slow)[:2]] == ["1", "2"]
        assert lapses == []


# --- (b) bad URLs: 400 with the error body, never a 500

BAD_URLS = [
    "http://a..b.com/",  # empty label
    "http://.a.com/",
    "http://a.com../",
    f"http://{'a' * 64}.com/",  # a label over 63
    "http://" + ".".join(["a" * 60] * 5) + ".com/",  # a host over 253
    "ftp://a.com/",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "gopher://a.com:70/",
    "http:a.com",
    "//a.com/x",
    "http://user:pw@a.com/",
    "http://user@a.com/",
    "http://@a.com/",
    "http://a.com\\@b.com/",
    "http:///x",
    "http://:80/",
    "http://?x",
    "http://a.com:0/",
    "http://a.com:65536/",
    "http://a.com:99999999999/",
    "http://a.com:abc/",
    "http://a.com:+80/",
    "http://a.com:-1/",
    "http://a.com:\uff18\uff10/",  # fullwidth digits
    "http://a.com:80:80/",
    "http://a.com:8080/",  # a port not in allowed_ports
    "http://a.com:22/",
    "http://[fe80::1%25eth0]/",  # zone ids
    "http://[fe80::1%eth0]/",
    "http://[::1/",
    "http://a.com]/",
    "http://[1.2.3.4]/",
    "http://[v1.x]/",
    "http://[::g]/",
    " http://a.com/",
    "http://a.com/ x",
    "http://a\tb.com/",
    "http://a.com/\n",
    "http://a.com/\x00",
    "http://a.com/\x7f",
    "http://a\u200b.com/",  # zero-width space
    "http://a.com/\u202e",  # right-to-left override
    "http://a.com\u3000/",  # ideographic space
    "http://a.com/?q=\ud800",  # a lone surrogate
    "http://a.com/" + "x" * 2100,
    "http://\uff41.com/",  # fullwidth a: not IDNA 2008
    "http://\u0300a.com/",  # a leading combining mark
    "http://\u2488.com/",  # one character holding a dot
    "http://xn--.com/",
    "http://-a.com/",
    "http://a-.com/",
    "http://a%2e.com/",
    "http://a!b.com/",
    "http://127.1/",  # IPv4 in disguise
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://1.2.3.4.5/",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_url_is_refused_by_name(url: str) -> None:
    with pytest.raises(WebhookRefused) as e:
        parse_webhook_url(url, Webhooks())
    assert e.value.status == 400 and e.value.details == {"field": "webhook_url"}


async def test_every_bad_url_shape_answers_400_with_the_error_body(make_system) -> None:
    system: System = await make_system(config=config(), start=False)
    async with running_gateway(system.settings, system.config) as gw, httpx.AsyncClient(base_url=gw) as http:
        wrong: list[tuple[str | bytes, int, Any]] = []
        for url in [*BAD_URLS, "not a url", "", "http://" + "a" * 3000]:
            if "\ud800" in url:  # not valid JSON at all: among the raw bodies below
                continue
            sent = json.dumps({"content": "x", "webhook_url": url})  # ASCII: lone surrogates escaped
            r = await http.post("/v1/ask/pa", content=sent, headers={"content-type": "application/json"})
            body = r.json()
            if not (
                r.status_code == 400
                and set(body) == {"error", "error_code", "details"}
                and body["error_code"] in ("VALIDATION_ERROR", "WEBHOOK_URL_REFUSED")
                and body["details"] == {"field": "webhook_url"}
            ):
                wrong.append((url, r.status_code, body))
        for raw in (b'"http://a.com/\\ud800"', b"123", b"[]", b'"http://a.com/\\u0000"'):
            r = await http.post("/v1/ask/pa", content=b'{"content": "x", "webhook_url": ' + raw + b"}")
            if r.status_code != 400 or "error_code" not in r.json():
                wrong.append((raw, r.status_code, r.json()))
        assert wrong == []
        assert not await system.client.redis.exists(system.client.names.webhooks_due())


# --- (c) addresses and ports


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::808:808",  # local-use NAT64
        "::7f00:1",  # IPv4-compatible
        "::808:808",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "fec0::1",  # site-local
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2001::1",  # Teredo
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fe80::1%eth0",
        "ff02::1",
        "::",
        "::1",
        "2001:db8::1",
        "100::1",
        "127.0.0.1",
        "10.0.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.0.1",
        "198.18.0.1",
        "192.0.2.1",
    ],
)
def test_an_address_that_is_or_embeds_a_private_one_is_refused(address: str) -> None:
    assert refusal(address) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "64:ff9b::808:808", "::ffff:8.8.8.8"]
)
def test_a_public_address_is_allowed(address: str) -> None:
    assert refusal(address) is None


async def test_ip_literal_urls_are_checked_without_dns() -> None:
    for url in (
        "http://[64:ff9b::7f00:1]/",
        "http://[::7f00:1]/",
        "http://[fec0::1]/",
        "http://[2002:7f00:1::]/",
    ):
        with pytest.raises(WebhookRefused, match="allow_hosts"):
            await check_webhook_url(url, Webhooks())
    assert (await check_webhook_url("https://[2001:4860:4860::8888]/x", Webhooks())).port == 443


def test_ports() -> None:
    default = Webhooks()
    assert parse_webhook_url("http://hooks.example.com/", default).port == 80
    assert parse_webhook_url("https://hooks.example.com:443/", default).port == 443
    for url in ("http://hooks.example.com:8080/", "https://hooks.example.com:22/", "http://8.8.8.8:25/"):
        with pytest.raises(WebhookRefused, match="not allowed"):
            parse_webhook_url(url, default)
    custom = Webhooks(allowed_ports=[8443])
    assert parse_webhook_url("https://hooks.example.com:8443/", custom).port == 8443
    with pytest.raises(WebhookRefused):
        parse_webhook_url("https://hooks.example.com/", custom)
    # a host the operator allowed is allowed on any port (the tests' receivers on loopback)
    allowed = Webhooks(allow_hosts=["127.0.0.1", "[::1]", "Hooks.Internal."])
    for url in ("http://127.0.0.1:39999/", "http://[::1]:8080/", "http://hooks.internal:9000/"):
        assert parse_webhook_url(url, allowed).allowed


def test_a_url_is_normalized_for_the_request() -> None:
    t = parse_webhook_url("https://B\u00fccher.Example./caf\u00e9?x=[1]#frag", Webhooks())
    assert (t.host, t.port, t.target, t.host_header) == (
        "xn--bcher-kva.example",
        443,
        b"/caf%C3%A9?x=%5B1%5D",
        t.host,
    )
    assert parse_webhook_url("http://[2001:db8::1]:80/", Webhooks()).host_header == "[2001:db8::1]"


# --- (d) the connection goes to the address that was checked


async def test_a_delivery_connects_to_the_address_its_check_resolved(make_system, monkeypatch) -> None:
    # Given a name whose lookups answer 127.0.0.1 for the request's check and the delivery's,
    # and 127.0.0.2 (nobody listening) for any lookup after that
    given = fake_dns(monkeypatch, lambda n: "127.0.0.1" if n < 2 else "127.0.0.2")
    system: System = await make_system(config=config(allow=(PINNED,)))
    async with (
        RawHook().serving() as hook,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        rid = await ask(http, hook.url("/fast", host=PINNED))
        await wait_until(lambda: bool(hook.of(rid)), 10, "the delivery")
        # Then the first attempt got through: to the checked address, with the name as Host
        (conn,) = hook.of(rid)
        assert conn.headers["x-webhook-attempt"] == "1"
        assert conn.headers["host"] == f"{PINNED}:{hook.port}"
        assert given == ["127.0.0.1", "127.0.0.1"]  # one lookup each: the request's, the attempt's


async def test_host_and_tls_name_stay_the_urls_while_the_address_is_pinned(make_system) -> None:
    # Given a check that resolves a public address, then a name rebound to loopback
    system: System = await make_system(config=config(), start=False)
    answers = iter(["93.184.215.14", "127.0.0.1"])
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "2001:4860:4860::8888":
            raise httpx.ConnectError("unreachable", request=request)
        return httpx.Response(204, stream=_Unread())

    deliverer = Deliverer(system.client, system.config.webhooks, None)
    deliverer._http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    with pytest.MonkeyPatch.context() as mp:
        fake_dns(mp, lambda n: next(answers))
        target = parse_webhook_url(f"https://{PINNED}/in?x=1", Webhooks())
        # When a delivery attempt runs, it posts to that address with the URL's name as Host and SNI
        assert await deliverer._attempt(target, "r1", 1, b"{}", b"k" * 32) is None
        (req,) = seen
        assert (req.url.scheme, req.url.host, req.url.port, req.url.raw_path) == (
            "https",
            "93.184.215.14",
            None,
            b"/in?x=1",
        )
        assert req.headers["host"] == PINNED and req.extensions["sni_hostname"] == PINNED
        # And the next attempt, whose lookup answers loopback, is refused before any connection
        with pytest.raises(WebhookRefused, match="loopback"):
            await deliverer._attempt(target, "r1", 2, b"{}", b"k" * 32)
        assert len(seen) == 1
    # An address that refuses the connection hands over to the next one that was checked
    seen.clear()
    both = Webhooks(allow_hosts=[PINNED])
    with pytest.MonkeyPatch.context() as mp:
        real = socket.getaddrinfo
        mp.setattr(
            socket,
            "getaddrinfo",
            lambda host, port, *a, **kw: (
                [
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:4860:4860::8888", port, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
                ]
                if host == PINNED
                else real(host, port, *a, **kw)
            ),
        )
        target = parse_webhook_url(f"http://{PINNED}:8080/", both)
        assert await deliverer._attempt(target, "r2", 1, b"{}", b"k" * 32) is None
    assert [r.url.host for r in seen] == ["2001:4860:4860::8888", "8.8.8.8"]
    assert seen[1].headers["host"] == f"{PINNED}:8080" and "sni_hostname" not in seen[1].extensions
    await deliverer._http.aclose()


class _Unread(httpx.AsyncByteStream):
    """An answer body still to be read, as from a real connection (MockTransport reads others)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b""


def _tls(tmp: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA (its PEM file) and a server context with a certificate it signed for ``name``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("agentpool test CA", ca_key, "agentpool test CA", ca_key, ca=True)
    leaf = cert(name, key, "agentpool test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "leaf.pem", tmp / "key.pem")
    return tmp / "ca.pem", ctx


@pytest.mark.parametrize("cert_name", [PINNED, "other.test"])
async def test_tls_checks_the_urls_name_on_the_pinned_address(
    make_system, monkeypatch, tmp_path: Path, cert_name: str
) -> None:
    ca, tls = _tls(tmp_path, cert_name)
    names: list[str | None] = []
    tls.sni_callback = lambda _sock, name, _ctx: names.append(name)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the gateway's webhook client trusts the test CA
    fake_dns(monkeypatch, lambda n: "127.0.0.1")
    system: System = await make_system(config=config(allow=(PINNED,)))
    async with (
        RawHook(tls=tls).serving() as hook,
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        rid = await ask(http, hook.url("/fast", host=PINNED))
        if cert_name == PINNED:  # the certificate names the URL's host: delivered
            await wait_until(lambda: bool(hook.of(rid)), 10, "the delivery over TLS")
            assert hook.of(rid)[0].headers["host"] == f"{PINNED}:{hook.port}"
        else:  # it names another host: refused by the gateway, retried, never delivered
            record = system.client.names.webhook(rid)

            async def attempts() -> int:
                return int(await system.client.redis.hget(record, "attempts") or 0)

            await wait_until(lambda: _at_least(attempts, 2), 10, "two failed attempts")
            assert hook.conns == []
        assert names and set(names) == {PINNED}  # SNI named the host, not 127.0.0.1


async def _at_least(value: Callable[[], Any], n: int) -> bool:
    return bool(await value() >= n)


# --- (e) signatures with a timestamp


def test_a_signature_verifies_only_fresh_and_unchanged() -> None:
    secret, body, ts = "s3cret", b'{"request_id":"r1"}', int(time.time())
    sig = sign(secret.encode(), body, ts)
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert sig == f"sha256={mac}"  # the documented signing string
    assert verify(secret, body, str(ts), sig) and verify(secret.encode(), body, ts, sig)
    assert verify(secret, body, str(ts), sig, now=ts + 299)
    # a captured delivery replayed after the window, or stamped in the future, is refused
    assert not verify(secret, body, str(ts), sig, now=ts + 301)
    assert not verify(secret, body, str(ts), sig, now=ts - 301)
    assert verify(secret, body, str(ts), sig, now=ts + 3000, tolerance_s=3600)
    # as is anything changed: body, timestamp, secret, or a malformed header
    assert not verify(secret, body + b" ", str(ts), sig)
    assert not verify(secret, body, str(ts - 1), sig)
    assert not verify("other", body, str(ts), sig)
    for bad_ts in ("", " 1", f"{ts}\n", "1e9", "-1", f"{ts}.0", "\u0661\u0662"):
        assert not verify(secret, body, bad_ts, sig)
    for bad_sig in ("", mac, "sha256=" + "0" * 64, sig + "\u00e9"):
        assert not verify(secret, body, str(ts), bad_sig)


# --- (f) secrets after Redis lost its data


async def _secrets(urls: list[str]) -> list[str]:
    async with httpx.AsyncClient() as http:
        return [(await http.get(f"{u}/v1/webhooks/secret")).json()["secret"] for u in urls]


async def _wipe(system: System) -> None:
    keys = [k async for k in system.client.redis.scan_iter(match=system.client.names.pattern())]
    if keys:
        await system.client.redis.delete(*keys)


async def test_derived_secrets_agree_across_gateways_after_redis_loses_its_data(
    make_system, monkeypatch
) -> None:
    master = "m" * 32
    monkeypatch.setenv(webhooks.SECRET_ENV, master)
    system: System = await make_system(config=config(), start=False)
    async with running_gateway(system.settings, system.config) as one:
        async with running_gateway(system.settings, system.config) as two:
            before = await _secrets([one, two])
        # When Redis loses everything and a gateway restarts
        await _wipe(system)
        async with running_gateway(system.settings, system.config) as three:
            after = await _secrets([one, three])
    # Then every gateway signs with the same secret, before and after, derived from the master
    expected = hmac.new(master.encode(), b"default", hashlib.sha256).hexdigest()
    assert before == after == [expected, expected]
    assert tenant_secret(master.encode(), "default").decode() == expected
    assert tenant_secret(master.encode(), "other") != tenant_secret(master.encode(), "default")


async def test_random_secrets_change_with_redis_but_never_diverge(make_system, caplog) -> None:
    system: System = await make_system(config=config(), start=False)
    with caplog.at_level(logging.WARNING, logger="agentpool.webhooks"):
        async with (
            running_gateway(system.settings, system.config) as one,
            running_gateway(system.settings, system.config) as two,
        ):
            before = await _secrets([one, two])
            await _wipe(system)
            after = await _secrets([one, two])
    assert before[0] == before[1] and after[0] == after[1] and after != before  # no stale cache
    assert any("Redis that loses its data" in r.message for r in caplog.records)


def test_the_master_secret_comes_from_the_environment() -> None:
    assert configured_secret(Webhooks(), {}) is None
    assert configured_secret(Webhooks(), {webhooks.SECRET_ENV: "x" * 16}) == b"x" * 16
    named = Webhooks(secret_env="HOOK_MASTER")
    assert configured_secret(named, {"HOOK_MASTER": "y" * 20, webhooks.SECRET_ENV: "x" * 16}) == b"y" * 20
    with pytest.raises(ConfigError, match="HOOK_MASTER"):
        configured_secret(named, {webhooks.SECRET_ENV: "x" * 16})
    with pytest.raises(ConfigError, match="at least 16"):
        configured_secret(Webhooks(), {webhooks.SECRET_ENV: "short"})
