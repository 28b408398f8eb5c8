"""Webhook delivery that survives gateway restarts and never runs twice at once.

Each webhook request gets a record ``webhook:{request_id}`` (URL, tenant, attempts, and the
payload once built) and an entry in the sorted set ``webhooks:due`` (request id -> unix ms when a
gateway should next look at it), both written *before* the request is published. Every gateway
runs one :class:`Deliverer` loop that claims due entries with a Lua script: the claim pushes the
entry's due time past the delivery timeout (a lease), so two gateways never hold it at once, and a
gateway that dies mid-delivery leaves it to be claimed again when the lease runs out.

The gateway that accepted the request watches its reply stream and makes the entry due as soon as
the final event lands; if that gateway is gone, the entry falls due after ``WATCH_FALLBACK_S`` and
any gateway polls the reply stream. Deliveries are POSTs of :class:`WebhookPayload` JSON signed
``X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body>``; a non-2xx answer or a timeout is
retried with exponential backoff up to ``max_attempts``. Delivery is at least once: receivers
dedupe by ``X-Request-ID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httpx
import msgspec
from redis.typing import EncodableT, FieldT

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.redis_conn import REDIS_ERRORS
from agentpool.gateway.schemas import PendingApproval, WebhookError, WebhookPayload
from agentpool.gateway.urlcheck import check_webhook_url
from agentpool.shared.api_config import Webhooks
from agentpool.shared.errors import ConfigError, WebhookRefused
from agentpool.shared.messages import FINAL_TYPES, End, Error, Interrupt
from agentpool.shared.tasks import cancel_and_wait

log = logging.getLogger("agentpool.webhooks")

WATCH_FALLBACK_S = 15.0  # no gateway saw the end by then: poll the reply stream
WAITING_POLL_S = 2.0  # a claimed request still running: look again this much later
START_GRACE_S = 1.0  # past start_by with no start event: the request timed out in the queue
DUE_POLL_S = 0.25
CLAIM_BATCH = 32
RECORD_TTL_S = 7 * 24 * 3600
_ENC = msgspec.json.Encoder()

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def payload_for(request_id: str, thread_id: str, pool: str, kind: bytes, data: bytes) -> bytes:
    """The webhook body for a final reply event."""
    if kind == b"end":
        end = msgspec.json.decode(data, type=End)
        p = WebhookPayload(
            request_id=request_id,
            thread_id=thread_id,
            pool=pool,
            status="completed",
            agent_id=end.agent_id,
            content=end.content,
            usage=end.usage,
            timings=end.timings,
            created_at=end.created_at,
            steps=end.steps,
        )
    elif kind == b"interrupt":
        paused = msgspec.json.decode(data, type=Interrupt)
        p = WebhookPayload(
            request_id=request_id,
            thread_id=thread_id,
            pool=pool,
            status="interrupted",
            agent_id=paused.agent_id,
            content=paused.content,
            usage=paused.usage,
            steps=paused.steps,
            interrupt=PendingApproval(tool_call=paused.tool_call),
        )
    else:
        err = msgspec.json.decode(data, type=Error)
        p = WebhookPayload(
            request_id=request_id,
            thread_id=thread_id,
            pool=pool,
            status="failed",
            error=WebhookError(error=err.error, error_code=err.error_code),
        )
    return _ENC.encode(p)


def configured_secret(config: Webhooks, env: Mapping[str, str]) -> bytes | None:
    """The one signing secret named by ``[webhooks] secret_env``; None = a secret per tenant."""
    if config.secret_env is None:
        return None
    value = env.get(config.secret_env)
    if not value:
        raise ConfigError(f"webhooks.secret_env: environment variable {config.secret_env} is not set")
    return value.encode()


def _ms(t: float) -> int:
    return int(t * 1000)


class Deliverer:
    def __init__(self, client: AgentPoolClient, config: Webhooks, secret: bytes | None) -> None:
        self.client = client
        self.config = config
        self.redis = client.redis
        self.names = client.names
        self._claim = self.redis.register_script(_CLAIM)
        self._secret = secret  # from :func:`configured_secret`, read at start
        self._tenant_secrets: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle
    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.config.timeout_s, follow_redirects=False)
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])
        if self._http is not None:
            await self._http.aclose()

    # --- the request side
    async def schedule(
        self, request_id: str, *, url: str, tenant: str, pool: str, thread_id: str, start_by: float
    ) -> None:
        """Persist a pending delivery (before the request is published)."""
        key = self.names.webhook(request_id)
        record: dict[FieldT, EncodableT] = {
            "url": url,
            "tenant": tenant,
            "pool": pool,
            "thread_id": thread_id,
            "start_by": repr(start_by),
            "attempts": 0,
        }
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(key, mapping=record)
            p.expire(key, RECORD_TTL_S)
            p.zadd(self.names.webhooks_due(), {request_id: _ms(time.time() + WATCH_FALLBACK_S)})
            await p.execute()

    async def cancel(self, request_id: str) -> None:
        """Forget a delivery whose request was never published."""
        await self._forget(request_id)

    async def ready(self, request_id: str) -> None:
        """The result is in: deliver now (on whichever gateway claims it first)."""
        await self.redis.zadd(self.names.webhooks_due(), {request_id: _ms(time.time())}, xx=True)
        self._wake.set()

    async def secret_for(self, tenant: str) -> bytes:
        """The configured secret, else the tenant's own (made on first use, kept in Redis)."""
        if self._secret is not None:
            return self._secret
        if tenant not in self._tenant_secrets:
            key = self.names.webhook_secret(tenant)
            await self.redis.set(key, secrets.token_hex(32), nx=True)
            value = await self.redis.get(key)
            self._tenant_secrets[tenant] = cast(bytes, value)
        return self._tenant_secrets[tenant]

    # --- the delivery loop
    async def _run(self) -> None:
        while True:
            try:
                ids = await self._claim(
                    keys=[self.names.webhooks_due()],
                    args=[_ms(time.time()), _ms(time.time() + self.config.timeout_s + 5), CLAIM_BATCH],
                )
                await asyncio.gather(*(self._process_safely(raw.decode()) for raw in ids))
                if len(ids) == CLAIM_BATCH:
                    continue
            except REDIS_ERRORS as e:
                log.warning("webhook loop lost Redis: %s", e)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancel that lands as the
            # timeout fires into TimeoutError, which this suppress would swallow (seen: a gateway
            # that never finished its shutdown, this task stuck "cancelling" here).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DUE_POLL_S):
                    await self._wake.wait()
            self._wake.clear()

    async def _process_safely(self, request_id: str) -> None:
        try:
            await self._process(request_id)
        except (*REDIS_ERRORS, msgspec.DecodeError) as e:  # the lease runs out; another try follows
            log.warning("webhook for %s not processed: %s", request_id, e, extra={"request_id": request_id})
        except Exception:  # a bug must not stop every other delivery; the lease retries this one
            log.exception("webhook for %s failed unexpectedly", request_id, extra={"request_id": request_id})

    async def _process(self, request_id: str) -> None:
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self.names.webhook(request_id)))
        rec = {k.decode(): v for k, v in raw.items()}
        if not rec:
            await self.redis.zrem(self.names.webhooks_due(), request_id)
            return
        payload = rec.get("payload") or await self._build(request_id, rec)
        if payload is None:
            await self._due_in(request_id, WAITING_POLL_S)
            return
        await self._deliver(request_id, rec, payload)

    async def _build(self, request_id: str, rec: dict[str, bytes]) -> bytes | None:
        """The payload once the request has a final event (timing it out if it never started)."""
        reply = self.names.reply(request_id)
        fields = await self._final(reply)
        if fields is None:
            may_start = time.time() < float(rec["start_by"]) + START_GRACE_S
            if may_start or await self.redis.xrange(reply, count=1):
                return None  # still running, or may still start
            await self.client.store.finish(
                Error(
                    request_id=request_id,
                    error_code="QUEUE_TIMEOUT",
                    error="no agent started the request before its max_wait_s",
                )
            )
            fields = await self._final(reply)
            if fields is None:
                return None
        payload = payload_for(
            request_id, rec["thread_id"].decode(), rec["pool"].decode(), fields[b"t"], fields[b"d"]
        )
        await self.redis.hset(self.names.webhook(request_id), "payload", payload)
        return payload

    async def _final(self, reply: str) -> dict[bytes, bytes] | None:
        """The fields of the stream's final event, if it has one."""
        last = cast(list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrevrange(reply, count=1))
        return last[0][1] if last and last[0][1][b"t"] in FINAL_TYPES else None

    async def _deliver(self, request_id: str, rec: dict[str, bytes], payload: bytes) -> None:
        url, tenant = rec["url"].decode(), rec["tenant"].decode()
        host = urlsplit(url).hostname  # the URL itself may hold tokens: log the host only
        extra = {"request_id": request_id, "webhook_host": host}
        try:
            await check_webhook_url(url, self.config.allow_hosts)
        except WebhookRefused as e:
            log.warning("webhook for %s dropped: %s", request_id, e.message, extra=extra)
            await self._forget(request_id)
            return
        attempt = int(await self.redis.hincrby(self.names.webhook(request_id), "attempts", 1))
        why = await self._post(url, request_id, attempt, payload, await self.secret_for(tenant))
        if why is None:
            log.info("webhook for %s delivered (attempt %d)", request_id, attempt, extra=extra)
            await self._forget(request_id)
        elif attempt >= self.config.max_attempts:
            log.error("webhook for %s given up after %d attempts: %s", request_id, attempt, why, extra=extra)
            await self._forget(request_id)
        else:
            delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (attempt - 1))
            log.warning(
                "webhook for %s failed (attempt %d: %s); retry in %.1fs",
                request_id,
                attempt,
                why,
                delay,
                extra=extra,
            )
            await self._due_in(request_id, delay * random.uniform(0.9, 1.1))

    async def _post(
        self, url: str, request_id: str, attempt: int, payload: bytes, secret: bytes
    ) -> str | None:
        """None on a 2xx answer, else why not."""
        assert self._http is not None
        headers = {
            "Content-Type": "application/json",
            "X-Webhook-Signature": sign(secret, payload),
            "X-Request-ID": request_id,
            "X-Webhook-Attempt": str(attempt),
            "User-Agent": "agentpool-webhooks",
        }
        try:
            r = await self._http.post(url, content=payload, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            return type(e).__name__
        return None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"

    async def _due_in(self, request_id: str, delay_s: float) -> None:
        await self.redis.zadd(self.names.webhooks_due(), {request_id: _ms(time.time() + delay_s)}, xx=True)

    async def _forget(self, request_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.zrem(self.names.webhooks_due(), request_id)
            p.delete(self.names.webhook(request_id))
            await p.execute()
