"""API keys in Redis: created, listed and revoked by ``agentpool keys`` and the admin API.

A key reads ``ap_<key_id>_<secret>``: the id finds the record, the secret is 256 random bits.
Only the key's SHA-256 is stored. A fast hash is enough here, unlike for passwords: with 256 bits
of entropy nobody can brute-force the hash, so a slow KDF (bcrypt/argon2) would only cost every
request milliseconds of CPU. Comparison uses ``hmac.compare_digest`` (constant time).

No starlette import: the CLI uses this module without the ASGI stack.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import cast

import msgspec
import redis.asyncio as aredis
from redis.typing import EncodableT, FieldT

from agentpool.shared.api_config import SCOPES, TENANT_PATTERN
from agentpool.shared.errors import BadRequest
from agentpool.shared.names import Names

KEY_PREFIX = "ap"
KEY_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_KEY = re.compile(r"^ap_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_TENANT = re.compile(TENANT_PATTERN)


class KeyInfo(msgspec.Struct, kw_only=True):
    """What can be shown about a key: everything but the key and its hash."""

    id: str
    tenant: str
    scopes: list[str]
    created_at: float
    source: str = "redis"  # redis | config | dev
    requests_per_minute: int | None = None  # None = the pools file's default per key


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode(), b.encode())


def split_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    m = _KEY.match(key)
    return m.group(1) if m else None


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def check_grant(tenant: str, scopes: list[str]) -> None:
    if not _TENANT.match(tenant):
        raise BadRequest(f"tenant must be 1-63 of [a-z0-9_-], got {tenant!r}", error_code="VALIDATION_ERROR")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise BadRequest(
            f"scopes must be a non-empty subset of {list(SCOPES)}", error_code="VALIDATION_ERROR"
        )


class KeyStore:
    """Key records under the namespace: ``apikey:{id}`` hashes plus the ``apikeys`` id set."""

    def __init__(self, redis: aredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    async def create(
        self, tenant: str, scopes: list[str], *, rpm: int | None = None, dev: bool = False
    ) -> tuple[KeyInfo, str]:
        """A new key -> (its info, the plain key, to show once)."""
        check_grant(tenant, scopes)
        key_id, key = new_key()
        info = KeyInfo(
            id=key_id,
            tenant=tenant,
            scopes=sorted(set(scopes)),
            created_at=time.time(),
            source="dev" if dev else "redis",
            requests_per_minute=rpm,
        )
        record: dict[FieldT, EncodableT] = {"sha256": sha256_hex(key), "info": msgspec.json.encode(info)}
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(self.names.api_key(key_id), mapping=record)
            p.sadd(self.names.api_keys(), key_id)
            await p.execute()
        return info, key

    async def get(self, key_id: str) -> tuple[str, KeyInfo] | None:
        """-> (sha256 hex, info) of a live key."""
        rec = cast(dict[bytes, bytes], await self.redis.hgetall(self.names.api_key(key_id)))
        if not rec:
            return None
        return rec[b"sha256"].decode(), msgspec.json.decode(rec[b"info"], type=KeyInfo)

    async def list(self, tenant: str | None = None) -> list[KeyInfo]:
        out = []
        for raw in sorted(cast(set[bytes], await self.redis.smembers(self.names.api_keys()))):
            found = await self.get(raw.decode())
            if found is not None and (tenant is None or found[1].tenant == tenant):
                out.append(found[1])
        return out

    async def revoke(self, key_id: str) -> bool:
        """Delete a key at once (the next request with it gets 401); False if there was none."""
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(self.names.api_key(key_id))
            p.srem(self.names.api_keys(), key_id)
            deleted, _ = await p.execute()
        return bool(deleted)
