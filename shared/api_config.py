"""Pools-file tables of the external API: bootstrap API keys, rate limits and webhooks.

Kept apart from ``shared/config.py`` so the external API's knobs read as one unit.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

# Tenants appear inside Redis keys (``thread:{tenant}:{thread_id}``); no ``:`` keeps them unambiguous.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
Tenant = Annotated[str, msgspec.Meta(pattern=TENANT_PATTERN)]
# ask: call pools; admin: manage the tenant's pools and keys; fleet: an operator's, whose admin
# reads and actions span every tenant's pools (the dashboard's fleet-wide view)
Scope = Literal["ask", "admin", "fleet"]
SCOPES: tuple[Scope, ...] = ("ask", "admin", "fleet")
_TENANT = re.compile(TENANT_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RateLimit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Requests per minute, shared by every gateway process; 0 = unlimited."""

    requests_per_minute: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


DEFAULT_KEY_RPM = 600


def key_rate_limit() -> RateLimit:
    """The default per-key limit when the pools file has no top-level ``[rate_limit]``."""
    return RateLimit(requests_per_minute=DEFAULT_KEY_RPM)


class ApiKeyEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A bootstrap key: its SHA-256 (hex) or the env var holding it; never the plain key itself."""

    tenant: Tenant
    scopes: list[Scope] = msgspec.field(default_factory=lambda: ["ask"])
    key_sha256: str | None = None
    key_env: str | None = None
    id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")] | None = None
    requests_per_minute: Annotated[int, msgspec.Meta(ge=0)] | None = None  # None = the default


class Webhooks(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Webhook delivery. ``allow_hosts`` may name loopback/private hosts, which are refused otherwise
    (a host listed there may be reached on any port; every other host only on ``allowed_ports``)."""

    allow_hosts: list[str] = []
    allowed_ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] = msgspec.field(
        default_factory=lambda: [80, 443]
    )
    # the env var holding the master secret each tenant's signing secret is derived from (HMAC of
    # the tenant); unset: AGENTPOOL_WEBHOOK_SECRET if set, else a random secret per tenant in Redis
    secret_env: str | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0  # one whole attempt: DNS to last byte
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32  # attempts running at once, per gateway
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=30)] = 8
    retry_base_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0  # backoff: base * 2^(attempt-1), capped
    retry_max_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0


def check_api(api_keys: list[ApiKeyEntry], pool_tenants: dict[str, str]) -> list[str]:
    """Cross-field problems of the external-API tables, each naming its field."""
    problems = []
    ids: set[str] = set()
    for i, k in enumerate(api_keys):
        where = f"api_keys[{i}]"
        if (k.key_sha256 is None) == (k.key_env is None):
            problems.append(f"{where}: give exactly one of key_sha256 or key_env (never a plain key)")
        if k.key_sha256 is not None and not _SHA256.match(k.key_sha256):
            problems.append(f"{where}.key_sha256: expected 64 lowercase hex digits")
        if not k.scopes:
            problems.append(f"{where}.scopes: give at least one of {list(SCOPES)}")
        key_id = k.id or f"config-{i}"
        if key_id in ids:
            problems.append(f"{where}.id: duplicate {key_id!r}")
        ids.add(key_id)
    for pool, tenant in pool_tenants.items():
        if not _TENANT.match(tenant):
            problems.append(f"pools.{pool}.tenant: expected 1-63 of [a-z0-9_-], got {tenant!r}")
    return problems
