"""Webhook URL safety: no posting into the gateway's own network (SSRF).

A URL is refused when its host resolves to any address that is not globally routable (loopback,
RFC 1918 private, link-local incl. cloud metadata 169.254.169.254, CGNAT, multicast, reserved,
unspecified), unless the pools file's ``[webhooks] allow_hosts`` names the host. It is checked
when the request arrives and again before each delivery, since DNS answers can change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

from agentpool.shared.errors import WebhookRefused

RESOLVE_TIMEOUT_S = 5.0
_FIELD = {"field": "webhook_url"}


def _parts(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise WebhookRefused(f"webhook_url is not a valid URL: {e}", details=_FIELD) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook_url must be an http(s) URL with a host", details=_FIELD)
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("webhook_url must not carry credentials", details=_FIELD)
    return parts


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def _addresses(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as e:
        raise WebhookRefused(f"webhook_url host does not resolve: {host}", details=_FIELD) from e
    return [str(info[4][0]) for info in infos]


async def check_webhook_url(url: str, allow_hosts: list[str]) -> None:
    """Raise :class:`WebhookRefused` (400) unless ``url`` may receive webhooks."""
    parts = _parts(url)
    host = (parts.hostname or "").lower()
    if host in {h.lower() for h in allow_hosts}:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await _addresses(host, port)
    if not addresses or not all(_public(a) for a in addresses):
        raise WebhookRefused(
            f"webhook_url host {host} resolves to a loopback, private or link-local address; "
            "list it in [webhooks] allow_hosts to allow it",
            details=_FIELD,
        )
