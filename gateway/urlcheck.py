"""Webhook URL safety: no posting into the gateway's own network (SSRF).

A URL is parsed strictly (http or https, a valid host name or IP literal, no credentials, no
IPv6 zone id, no whitespace or control characters, a port in ``[webhooks] allowed_ports``), its
host is resolved once, and it is refused when any address is not globally routable: loopback,
RFC 1918 private, link-local incl. cloud metadata 169.254.169.254, CGNAT, multicast, reserved,
unspecified, unique- and site-local, Teredo, IPv4-compatible, and the IPv6 forms that embed an
IPv4 address (mapped, NAT64, 6to4) when the embedded address is itself refused. A host named in
``[webhooks] allow_hosts`` skips the address and port rules.

The check runs when the request arrives and again before every delivery attempt, and the attempt
connects to the addresses that check returned: DNS is asked once per attempt, so a name cannot
resolve to a public address for the check and to a private one for the connection.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx

from agentpool.shared.api_config import Webhooks
from agentpool.shared.errors import WebhookRefused

RESOLVE_TIMEOUT_S = 5.0
MAX_URL_CHARS = 2048
MAX_HOST_CHARS = 253
DEFAULT_PORTS = {"http": 80, "https": 443}
_FIELD = {"field": "webhook_url"}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")  # 127.1, 2130706433, 0x7f.1: IPv4 in disguise
_BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"}  # controls, format (bidi, zero-width), spaces
_PCHARS = "/:@!$&'()*+,;=-._~%"  # kept as they are in the request target; the rest is %-encoded

_V4_REFUSED = [
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
]
_V6_REFUSED = [
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
]
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed webhook URL: what to connect to and what to tell the server (Host, TLS SNI)."""

    scheme: str
    host: str  # a lowercase ASCII (IDNA) host name, or an IP address without brackets
    port: int
    target: bytes  # the request target: path and query, percent-encoded
    allowed: bool  # named in [webhooks] allow_hosts: any address, any port

    @property
    def is_ip(self) -> bool:
        return _ip(self.host) is not None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _refuse(message: str) -> WebhookRefused:
    return WebhookRefused(f"webhook_url {message}", details=_FIELD)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_webhook_url(url: str, config: Webhooks) -> Target:
    """The URL's parts, or :class:`WebhookRefused` (400) naming what is wrong with it."""
    if len(url) > MAX_URL_CHARS:
        raise _refuse(f"is longer than {MAX_URL_CHARS} characters")
    if any(unicodedata.category(c) in _BAD_CATEGORIES for c in url):
        raise _refuse("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a bad port, unbalanced brackets, an IPv4 address in brackets
        raise _refuse(f"is not a valid URL: {e}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise _refuse("must be an http or https URL")
    if "@" in parts.netloc:
        raise _refuse("must not carry credentials")
    if not parts.hostname:
        raise _refuse("has no host")
    host = _host(parts.hostname, bracketed=parts.netloc.startswith("["))
    if port is None:
        port = DEFAULT_PORTS[parts.scheme]
    if not 1 <= port <= 65535:
        raise _refuse(f"port {port} is out of range (1-65535)")
    allowed = _allowed(host, config.allow_hosts)
    if not allowed and port not in config.allowed_ports:
        raise _refuse(f"port {port} is not allowed (allowed: {', '.join(map(str, config.allowed_ports))})")
    path = quote(parts.path or "/", safe=_PCHARS)
    query = "?" + quote(parts.query, safe=_PCHARS + "?") if parts.query else ""
    return Target(parts.scheme, host, port, (path + query).encode("ascii"), allowed)


def _host(raw: str, *, bracketed: bool) -> str:
    """The canonical host: an IP address, or a name checked label by label after IDNA."""
    if "%" in raw and bracketed:
        raise _refuse("must not carry an IPv6 zone id")
    ip = _ip(raw)
    if bracketed:
        if not isinstance(ip, ipaddress.IPv6Address):
            raise _refuse(f"host [{raw}] is not an IPv6 address")
        return str(ip)
    if ip is not None:
        return str(ip)
    name = raw.removesuffix(".")  # "example.com." is the same name, fully qualified
    if not name.isascii():
        try:  # httpx's IDNA 2008 encoding: what it would send as Host
            name = httpx.URL(scheme="http", host=name).raw_host.decode("ascii")
        except httpx.InvalidURL:
            raise _refuse(f"host {raw!r} is not a valid internationalized domain name") from None
    if len(name) > MAX_HOST_CHARS:
        raise _refuse(f"host is longer than {MAX_HOST_CHARS} characters")
    labels = name.split(".")
    bad = next((label for label in labels if not _LABEL.match(label)), None)
    if bad is not None:
        shape = "an empty label" if not bad else "a label over 63 characters" if len(bad) > 63 else None
        raise _refuse(f"host {raw!r} has {shape or f'an invalid label {bad!r}'}")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise _refuse(f"host {raw!r} is neither a host name nor a dotted IPv4 address")
    return name


async def resolve(target: Target) -> list[str]:
    """The host's addresses, looked up once (the caller connects to these); OSError if none."""
    if target.is_ip:
        return [target.host]
    # socket.getaddrinfo in a thread, as asyncio's loop.getaddrinfo does; uvloop's own would
    # answer the same, but this is the one resolver the check and the tests both go through.
    lookup = functools.partial(socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.run_in_executor(None, lookup)
    except UnicodeError as e:  # the codec's verdict on a name; parse_webhook_url should catch it first
        raise OSError(f"cannot look up {target.host!r}: {e}") from e
    found = [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not found:
        raise OSError(f"no IPv4 or IPv6 address for {target.host!r}")
    return list(dict.fromkeys(found))


def refusal(address: str) -> str | None:
    """Why ``address`` may not receive webhooks, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_refusal(ip)
    embedded = _embedded(ip)
    if embedded is not None:
        kind, v4 = embedded
        why = _v4_refusal(v4)
        if why is not None:
            return f"{kind} of {_a(why)}"
        if kind != "6to4":  # the packets go to the public IPv4 address itself
            return None
    why = next((why for net, why in _V6_REFUSED if ip in net), None)
    if why is None and (ip.is_reserved or not ip.is_global):
        why = "reserved" if ip.is_reserved else "not globally routable"
    return why


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 one carries to, and how (Teredo's is refused as a whole)."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def _a(words: str) -> str:
    vowel = words[:1].lower() in "aeiou" and not words.startswith("uni")  # a unique, an unspecified
    return ("an " if vowel else "a ") + words


def _v4_refusal(ip: ipaddress.IPv4Address) -> str | None:
    why = next((why for net, why in _V4_REFUSED if ip in net), None)
    if why is None and not ip.is_global:
        why = "not globally routable"
    return why


def check_addresses(target: Target, addresses: list[str]) -> None:
    """Raise :class:`WebhookRefused` unless every address may receive webhooks."""
    if target.allowed:
        return
    reasons = sorted({why for a in addresses if (why := refusal(a)) is not None})
    if reasons or not addresses:
        verb = "is" if target.is_ip else "resolves to"
        what = _a(" and ".join(reasons)) if reasons else "no"
        raise _refuse(
            f"host {target.host} {verb} {what} address; list the host in [webhooks] allow_hosts to allow it"
        )


def _allowed(host: str, allow_hosts: list[str]) -> bool:
    for entry in allow_hosts:
        name = entry.strip().strip("[]").lower().removesuffix(".")
        ip = _ip(name)
        if (str(ip) if ip is not None else name) == host:
            return True
    return False


async def check_webhook_url(url: str, config: Webhooks) -> Target:
    """Raise :class:`WebhookRefused` (400) unless ``url`` may receive webhooks."""
    target = parse_webhook_url(url, config)
    try:
        addresses = await resolve(target)
    except (OSError, TimeoutError) as e:
        raise _refuse(f"host does not resolve: {target.host}") from e
    check_addresses(target, addresses)
    return target
