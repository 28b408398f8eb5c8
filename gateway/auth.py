"""Who is calling: API key -> tenant and scopes, and the open-mode rule.

Keys come as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. A key that is sent is always
checked (bad or revoked -> 401), in every mode. A request *without* a key is let in as tenant
``default`` with every scope only under ``AGENTPOOL_AUTH=open`` (what ``agentpool dev`` runs with
unless the variable is set); ``required`` is the default. The mode comes from the process's
environment alone, never from Redis: a Redis that lost its data loses keys, and a lost key is a
401, never an open door.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from starlette.requests import Request

from agentpool.broker.client import AgentPoolClient
from agentpool.gateway.keys import KeyInfo, KeyStore, same_hash, sha256_hex, split_key
from agentpool.shared.api_config import SCOPES, ApiKeyEntry
from agentpool.shared.config import Pool
from agentpool.shared.errors import ConfigError, Forbidden, NotFound, Unauthorized

OPEN_TENANT = "default"
MAX_KEY_CHARS = 512
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; ``key_id`` is None for the anonymous caller of an open gateway."""

    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None
    requests_per_minute: int | None = None  # this key's own limit; None = the default


ANONYMOUS = Principal(OPEN_TENANT, frozenset(SCOPES))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer``; None when neither is sent.

    Another ``Authorization`` scheme, or two headers naming different keys, is a bad credential.
    """
    key = headers.get("x-api-key")
    authorization = headers.get("authorization")
    if authorization is None:
        return None if key is None else key.strip()
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or (key is not None and key.strip() != value.strip()):
        raise Unauthorized("send one API key: X-API-Key or Authorization: Bearer")
    return value.strip()


def _principal(info: KeyInfo) -> Principal:
    return Principal(info.tenant, frozenset(info.scopes), info.id, info.requests_per_minute)


def config_keys(entries: list[ApiKeyEntry], env: Mapping[str, str]) -> list[tuple[str, Principal]]:
    """(sha256, principal) of each bootstrap key; a ``key_env`` that is unset fails the start."""
    out = []
    for i, e in enumerate(entries):
        digest = e.key_sha256
        if e.key_env is not None:
            plain = env.get(e.key_env)
            if not plain:
                raise ConfigError(f"api_keys[{i}].key_env: environment variable {e.key_env} is not set")
            digest = sha256_hex(plain)
        assert digest is not None
        principal = Principal(e.tenant, frozenset(e.scopes), e.id or f"config-{i}", e.requests_per_minute)
        out.append((digest, principal))
    return out


class Authenticator:
    """Turns request headers into a :class:`Principal` or raises 401."""

    def __init__(self, store: KeyStore, keys: list[tuple[str, Principal]], mode: str) -> None:
        self.store = store
        self.mode = mode
        self.config_keys = keys  # from :func:`config_keys`, read at start

    def config_infos(self) -> list[KeyInfo]:
        return [
            KeyInfo(
                id=p.key_id or "",
                tenant=p.tenant,
                scopes=sorted(p.scopes),
                created_at=0.0,
                source="config",
                requests_per_minute=p.requests_per_minute,
            )
            for _, p in self.config_keys
        ]

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        key = presented_key(headers)
        if key is None:
            if self.mode == "open":
                return ANONYMOUS
            raise Unauthorized(
                "an API key is required (AGENTPOOL_AUTH=required, the default of `agentpool gateway`): "
                "send X-API-Key or Authorization: Bearer with a key from `agentpool keys create`"
            )
        found = await self._lookup(key) if 0 < len(key) <= MAX_KEY_CHARS else None
        if found is None:  # never echo the key: it may be a real key with a typo
            raise Unauthorized("the API key is not valid (unknown, malformed or revoked)")
        return found

    async def _lookup(self, key: str) -> Principal | None:
        digest = sha256_hex(key)
        key_id = split_key(key)
        if key_id is not None:
            rec = await self.store.get(key_id)
            if rec is not None and same_hash(digest, rec[0]):
                return _principal(rec[1])
        match = None
        for stored, principal in self.config_keys:  # few; compare all of them, in constant time each
            if same_hash(digest, stored):
                match = principal
        return match


async def require(request: Request, *scopes: str) -> Principal:
    """The caller, who must hold one of ``scopes`` (403 otherwise); kept on ``request.state.principal``."""
    auth: Authenticator = request.app.state.auth
    principal = await auth.authenticate(request.headers)
    request.state.principal = principal
    if principal.scopes.isdisjoint(scopes):
        needed = " or ".join(repr(s) for s in scopes)
        raise Forbidden(
            f"this API key lacks the {needed} scope", details={"required_scope": " or ".join(scopes)}
        )
    return principal


def pool_for(client: AgentPoolClient, principal: Principal, name: str) -> Pool:
    """The pool, if it is the caller's tenant's (or a per-tenant template, which gives each tenant its
    own pool); another tenant's pool looks exactly like no pool."""
    try:
        pool: Pool | None = client.pool(name)
    except NotFound:
        pool = None
    if pool is None or (pool.tenant != principal.tenant and not pool.per_tenant):
        raise NotFound(f"no pool named {name!r}", error_code="POOL_NOT_FOUND", details={"pool": name})
    return pool


async def owns(client: AgentPoolClient, principal: Principal, request_id: str) -> bool:
    """Did ``principal``'s tenant make this request (recorded at ``owner:{id}`` by the gateway)?"""
    if not REQUEST_ID.match(request_id):
        return False
    owner = await client.redis.get(client.names.owner(request_id))
    return owner is not None and cast(bytes, owner).decode() == principal.tenant
