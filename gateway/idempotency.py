"""``Idempotency-Key``: the same key and body within 24 h get the first request's answer.

The first request claims ``idem:{tenant}:{key}`` with ``SET NX`` (its request id, thread id and a
fingerprint of pool + body); a repeat with the same fingerprint reads the first request's reply
stream ``reply:{id}``, and one with another body gets 422 ``IDEMPOTENCY_CONFLICT``. A first
request that could not be published releases its claim so that a retry can go through.

The claiming gateway marks the claim ``published`` once RabbitMQ confirmed the request. A first
request that never started leaves no result either: its answer is ``QUEUE_TIMEOUT``, or it has
none past its ``start_by``, or its claim is still unpublished ``PUBLISH_GRACE_S`` after it was
made (the gateway that claimed the key died before publishing). A repeat then ends it with
``QUEUE_TIMEOUT`` itself, atomic with any worker that would start it (so it can never run too),
takes the claim over (:meth:`Idempotency.take_over`) and runs as the first.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import msgspec
import redis.asyncio as aredis
from starlette.requests import Request

from agentpool.gateway.schemas import AskBody
from agentpool.shared.errors import BadRequest, Conflict
from agentpool.shared.messages import Chat
from agentpool.shared.names import Names

IDEM_TTL_S = 24 * 3600
PUBLISH_GRACE_S = 5.0  # a claim unpublished this long after it was made: its gateway is gone
_POLL_S = 0.05  # a repeat of an unpublished claim looks again this often
MAX_KEY_CHARS = 256
_KEY = re.compile(r"^[\x21-\x7e]{1,256}$")  # visible ASCII: safe inside a Redis key and in logs
_CANON = msgspec.json.Encoder(order="sorted")
_CLAIM_OF = "string.sub(v, 1, #ARGV[1]) == ARGV[1]"  # ARGV[1]: _of(request id), how its JSON begins

_RELEASE = f"""
local v = redis.call('GET', KEYS[1])
if v and {_CLAIM_OF} then return redis.call('DEL', KEYS[1]) end
return 0
"""
# ARGV: "<request id>", the new value, its TTL in seconds (0: keep the TTL)
_REPLACE = f"""
local v = redis.call('GET', KEYS[1])
if not (v and {_CLAIM_OF}) then return 0 end
if ARGV[3] == '0' then redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


class Claim(msgspec.Struct, kw_only=True):
    """What the first request of a key recorded."""

    request_id: str
    thread_id: str
    fingerprint: str
    start_by: float
    webhook: bool = False
    claimed_at: float = 0.0  # unix seconds
    published: bool = False  # RabbitMQ confirmed the request


def _of(request_id: str) -> bytes:
    """How the JSON of ``request_id``'s claim begins (request_id is its first field)."""
    return b'{"request_id":' + msgspec.json.encode(request_id)


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, validated (1-256 visible ASCII characters)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _KEY.match(key):
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} visible ASCII characters",
            error_code="VALIDATION_ERROR",
            details={"header": "Idempotency-Key"},
        )
    return key


def fingerprint(pool: str, body: AskBody, chat: Chat | None = None) -> str:
    """Of the decoded body, so key order and whitespace do not make two bodies differ."""
    h = hashlib.sha256(pool.encode() + b"\0" + _CANON.encode(body))
    if chat is not None:
        h.update(b"\0" + _CANON.encode(chat))
    return h.hexdigest()


class Idempotency:
    def __init__(self, redis: aredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        self._release = redis.register_script(_RELEASE)
        self._replace = redis.register_script(_REPLACE)

    async def claim(self, tenant: str, key: str, claim: Claim) -> Claim | None:
        """None if this request is the first with ``key``; else the first one's claim (or 422)."""
        k = self.names.idem(tenant, key)
        if await self.redis.set(k, msgspec.json.encode(claim), nx=True, ex=IDEM_TTL_S):
            return None
        raw = await self.redis.get(k)
        if raw is None:  # expired between the two calls: claim again
            return await self.claim(tenant, key, claim)
        first = msgspec.json.decode(raw, type=Claim)
        if first.fingerprint != claim.fingerprint:
            raise Conflict(
                "this Idempotency-Key was used with a different request body",
                details={"request_id": first.request_id},
            )
        return first

    async def release(self, tenant: str, key: str, request_id: str) -> None:
        """Drop the claim of ``request_id`` (it was never published)."""
        await self._release(keys=[self.names.idem(tenant, key)], args=[_of(request_id)])

    async def published(self, tenant: str, key: str, claim: Claim) -> None:
        """Mark ``claim`` published (unless a repeat took it over meanwhile)."""
        await self._swap(tenant, key, claim, msgspec.structs.replace(claim, published=True), ttl_s=0)

    async def settled(self, tenant: str, key: str, first: Claim) -> Claim | None:
        """``first`` once it is published, or its grace is over; None if it was released or
        replaced meanwhile (claim again)."""
        k = self.names.idem(tenant, key)
        while not first.published and time.time() < first.claimed_at + PUBLISH_GRACE_S:
            await asyncio.sleep(_POLL_S)
            raw = await self.redis.get(k)
            now = None if raw is None else msgspec.json.decode(raw, type=Claim)
            if now is None or now.request_id != first.request_id:
                return None
            first = now
        return first

    async def take_over(self, tenant: str, key: str, stale: Claim, claim: Claim) -> bool:
        """Replace the ``stale`` claim (its request never started) by ``claim``; False if another
        repeat replaced it first."""
        return await self._swap(tenant, key, stale, claim, ttl_s=IDEM_TTL_S)

    async def _swap(self, tenant: str, key: str, old: Claim, new: Claim, ttl_s: int) -> bool:
        args: list[bytes | int] = [_of(old.request_id), msgspec.json.encode(new), ttl_s]
        return bool(await self._replace(keys=[self.names.idem(tenant, key)], args=args))

    async def keep_result(self, request_id: str) -> None:
        """Keep the reply stream (and its owner) as long as the key, not the usual hour."""
        async with self.redis.pipeline(transaction=False) as p:
            p.expire(self.names.reply(request_id), IDEM_TTL_S)
            p.expire(self.names.owner(request_id), IDEM_TTL_S)
            await p.execute()
