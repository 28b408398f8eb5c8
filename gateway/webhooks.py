"""Webhook delivery that survives gateway restarts and never runs twice at once.

Each webhook request gets a record ``webhook:{request_id}`` (URL, tenant, attempts, and the
payload once built) and an entry in the sorted set ``webhooks:due`` (request id -> unix ms when a
gateway should next look at it), both written *before* the request is published. Every gateway
runs one :class:`Deliverer` loop that claims due entries with a Lua script: the claim pushes the
entry's due time ``LEASE_S`` ahead (a lease) and records this gateway's token as its holder. Each
claimed delivery runs as its own task, at most ``max_in_flight`` at once, so a slow receiver
delays no other; while it runs, a heartbeat extends the lease only if this gateway still holds it
(a Lua compare), and the task is abandoned once it does not. A gateway that dies mid-delivery
leaves it to be claimed again when the lease runs out.

The gateway that accepted the request watches its reply stream and makes the entry due as soon as
the final event lands; if that gateway is gone, the entry falls due after ``WATCH_FALLBACK_S`` and
any gateway polls the reply stream. A delivery attempt is a POST of :class:`WebhookPayload` JSON,
bounded as a whole by ``timeout_s`` (lookup, connect, send, the entire answer), to the address the
SSRF check just resolved (:mod:`agentpool.gateway.urlcheck`), with the URL's host as Host and TLS
name. It is signed ``X-Webhook-Signature: sha256=<hex>``, an HMAC-SHA256 of
``f"{timestamp}."`` and the body with the tenant's secret, the timestamp sent as
``X-Webhook-Timestamp``; receivers check it with :func:`verify`. A non-2xx answer or a timeout is
retried with exponential backoff up to ``max_attempts``. Delivery is at least once: receivers
dedupe by ``X-Request-ID``.

Tenant secrets are derived from a master secret (``AGENTPOOL_WEBHOOK_SECRET``, or the variable
``[webhooks] secret_env`` names), so every gateway signs alike whatever Redis loses; without one,
each tenant gets a random secret kept in Redis, which a Redis that loses its data replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Mapping
from typing import Any, cast

import httpx
import msgspec
from redis.typing import EncodableT, FieldT

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.redis_conn import REDIS_ERRORS
from agentpool.gateway.schemas import PendingApproval, WebhookError, WebhookPayload
from agentpool.gateway.urlcheck import Target, check_addresses, parse_webhook_url, resolve
from agentpool.shared.api_config import Webhooks
from agentpool.shared.errors import ConfigError, WebhookRefused
from agentpool.shared.messages import FINAL_TYPES, End, Error, Interrupt
from agentpool.shared.tasks import cancel_and_wait

log = logging.getLogger("agentpool.webhooks")

WATCH_FALLBACK_S = 15.0  # no gateway saw the end by then: poll the reply stream
WAITING_POLL_S = 2.0  # a claimed request still running: look again this much later
START_GRACE_S = 1.0  # past start_by with no start event: the request timed out in the queue
DUE_POLL_S = 0.25
LEASE_S = 10.0  # a claim holds a delivery this long; the heartbeat renews it every quarter of that
MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer body, read (within the deadline) then dropped
RECORD_TTL_S = 7 * 24 * 3600
REPLAY_TOLERANCE_S = 300.0  # verify(): how far a delivery's timestamp may be from now
SECRET_ENV = "AGENTPOOL_WEBHOOK_SECRET"
MIN_SECRET_CHARS = 16
_ENC = msgspec.json.Encoder()

# KEYS: due, leases. ARGV: now ms, lease end ms, how many, this gateway's token.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  redis.call('HSET', KEYS[2], id, ARGV[4])
end
return ids
"""
# KEYS: due, leases. ARGV: id, token, new lease end ms. 1 = renewed, 0 = another holds it (or none).
_RENEW = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] or not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
# KEYS: due, leases, record. ARGV: id, token, next due ms ('' = forget the delivery). Only the holder.
_SETTLE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3])
else
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
end
return 1
"""
# KEYS: due, leases. ARGV: id, now ms. Due now, unless a gateway holds a live lease on it (that
# one finds the result itself: an early claim would post while it may be posting too).
_READY = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due then return 0 end
if tonumber(due) > tonumber(ARGV[2]) and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Webhook-Signature`` value: HMAC-SHA256 of ``f"{timestamp}."`` followed by ``body``."""
    return "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(
    secret: str | bytes,
    body: bytes,
    timestamp: str | int,
    signature: str,
    *,
    tolerance_s: float = REPLAY_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a delivery is genuine and fresh (for receivers).

    ``timestamp`` and ``signature`` are the ``X-Webhook-Timestamp`` and ``X-Webhook-Signature``
    headers, ``body`` the raw request body. A timestamp more than ``tolerance_s`` away from now
    (either way) fails, so a captured delivery cannot be replayed later; within the window,
    dedupe by ``X-Request-ID`` as for any redelivery.
    """
    if isinstance(timestamp, str):
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            return False
        timestamp = int(timestamp)
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.compare_digest(sign(key, body, timestamp).encode(), signature.encode("utf-8", "replace"))


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
            deployment=end.deployment,
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
            deployment=paused.deployment,
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
    """The master secret tenant secrets derive from: the variable ``[webhooks] secret_env`` names,
    else ``AGENTPOOL_WEBHOOK_SECRET``; None when neither is set (a random secret per tenant)."""
    name = config.secret_env or SECRET_ENV
    value = env.get(name, "")
    if not value:
        if config.secret_env is not None:
            raise ConfigError(f"webhooks.secret_env: environment variable {name} is not set")
        return None
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(f"{name}: a webhook master secret needs at least {MIN_SECRET_CHARS} characters")
    return value.encode()


def tenant_secret(master: bytes, tenant: str) -> bytes:
    """The tenant's signing secret: hex HMAC-SHA256(master, tenant), the same on every gateway."""
    return hmac.new(master, tenant.encode(), hashlib.sha256).hexdigest().encode()


def _ms(t: float) -> int:
    return int(t * 1000)


class Deliverer:
    """One gateway's webhook loop: claims due deliveries and runs each as its own task."""

    def __init__(self, client: AgentPoolClient, config: Webhooks, secret: bytes | None) -> None:
        self.client = client
        self.config = config
        self.redis = client.redis
        self.names = client.names
        self._due = self.names.webhooks_due()
        self._leases = self.names.webhook_leases()
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._settle = self.redis.register_script(_SETTLE)
        self._make_due = self.redis.register_script(_READY)
        self._master = secret  # from :func:`configured_secret`, read at start
        self._token = secrets.token_hex(8)  # names this gateway as a lease holder
        self._lease_s = LEASE_S
        self._inflight: dict[str, tuple[asyncio.Task[None], asyncio.Task[None]]] = {}  # work, its lease
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle
    async def start(self) -> None:
        if self._master is None:
            log.warning(
                "no webhook master secret (%s or [webhooks] secret_env): each tenant's signing "
                "secret is random and kept only in Redis, so a Redis that loses its data changes it",
                SECRET_ENV,
            )
        # An explicit transport: no proxy from the environment may take the pinned address over.
        # No keep-alive: a pooled connection, keyed by address, could carry another host's request.
        limits = httpx.Limits(max_connections=self.config.max_in_flight, max_keepalive_connections=0)
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(limits=limits),
            timeout=self.config.timeout_s,
            follow_redirects=False,
        )
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])
        held = dict(self._inflight)
        await cancel_and_wait([task for pair in held.values() for task in pair])
        try:  # hand what was cut short over now, not when its lease runs out
            for request_id in [rid for rid, (work, _) in held.items() if work.cancelled()]:
                await self._finish(request_id, due_in_s=0.0)
        except REDIS_ERRORS as e:
            log.warning("webhook leases not released at shutdown: %s", e)
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
            p.zadd(self._due, {request_id: _ms(time.time() + WATCH_FALLBACK_S)})
            await p.execute()

    async def cancel(self, request_id: str) -> None:
        """Forget a delivery whose request was never published."""
        async with self.redis.pipeline(transaction=True) as p:
            p.zrem(self._due, request_id)
            p.hdel(self._leases, request_id)
            p.delete(self.names.webhook(request_id))
            await p.execute()

    async def ready(self, request_id: str) -> None:
        """The result is in: deliver now (on whichever gateway claims it first)."""
        await self._make_due(keys=[self._due, self._leases], args=[request_id, _ms(time.time())])
        self._wake.set()

    async def secret_for(self, tenant: str) -> bytes:
        """The tenant's signing secret: derived from the master secret, else random and kept in Redis.

        The Redis one is read on every use, never cached: after Redis lost it, every gateway signs
        with the one that replaced it, not some with the old one.
        """
        if self._master is not None:
            return tenant_secret(self._master, tenant)
        key = self.names.webhook_secret(tenant)
        async with self.redis.pipeline(transaction=True) as p:
            p.set(key, secrets.token_hex(32), nx=True)
            p.get(key)
            _, value = await p.execute()
        return cast(bytes, value)

    # --- the delivery loop
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            free = self.config.max_in_flight - len(self._inflight)
            if free > 0:
                try:
                    now = time.time()
                    ids = await self._claim(
                        keys=[self._due, self._leases],
                        args=[_ms(now), _ms(now + self._lease_s), free, self._token],
                    )
                except REDIS_ERRORS as e:
                    log.warning("webhook loop lost Redis: %s", e)
                else:
                    for raw in ids:
                        self._spawn(raw.decode())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancel that lands as the
            # timeout fires into TimeoutError, which this suppress would swallow (seen: a gateway
            # that never finished its shutdown, this task stuck "cancelling" here).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DUE_POLL_S):
                    await self._wake.wait()  # a result is in, or a slot came free

    def _spawn(self, request_id: str) -> None:
        """Run one claimed delivery as its own task, and another that renews its lease meanwhile."""
        if request_id in self._inflight:  # re-claimed while its lease renewal was late: still ours
            return
        work = asyncio.create_task(self._process_safely(request_id), name=f"webhook-{request_id}")
        lease = asyncio.create_task(self._keep_lease(request_id, work), name=f"webhook-lease-{request_id}")
        self._inflight[request_id] = (work, lease)
        lease.add_done_callback(functools.partial(self._done, request_id, work))

    def _done(self, request_id: str, work: asyncio.Task[None], lease: asyncio.Task[None]) -> None:
        """The lease task ends after its work (or, on a bug, takes the work with it)."""
        self._inflight.pop(request_id, None)
        self._wake.set()
        for task in (work, lease):
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("webhook task %s failed", task.get_name(), exc_info=task.exception())
        work.cancel()  # a no-op once done

    async def _keep_lease(self, request_id: str, work: asyncio.Task[None]) -> None:
        """Renew the lease on ``request_id`` until ``work`` is done; cancel ``work`` once it is lost."""
        every_s = self._lease_s / 4
        held_until = time.monotonic() + self._lease_s
        while True:
            await asyncio.wait([work], timeout=every_s)
            if work.done():
                return
            asked = time.monotonic()
            try:
                async with asyncio.timeout(every_s):
                    held = await self._renew(
                        keys=[self._due, self._leases],
                        args=[request_id, self._token, _ms(time.time() + self._lease_s)],
                    )
                if held:
                    held_until = asked + self._lease_s
            except REDIS_ERRORS as e:  # incl. TimeoutError: go on while the lease surely holds until
                held = time.monotonic() + 2 * every_s < held_until  # the next renewal's answer
                log.warning(
                    "webhook lease of %s not renewed: %r", request_id, e, extra={"request_id": request_id}
                )
            if not held:
                log.warning(
                    "webhook for %s abandoned: its lease ran out (another gateway may deliver it)",
                    request_id,
                    extra={"request_id": request_id},
                )
                await cancel_and_wait([work])
                return

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
            await self._finish(request_id)
            return
        payload = rec.get("payload") or await self._build(request_id, rec)
        if payload is None:
            await self._finish(request_id, due_in_s=WAITING_POLL_S)
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
        extra: dict[str, Any] = {"request_id": request_id}
        try:
            target = parse_webhook_url(url, self.config)  # the rules may have changed since
        except WebhookRefused as e:
            log.warning("webhook for %s dropped: %s", request_id, e.message, extra=extra)
            await self._finish(request_id)
            return
        extra["webhook_host"] = target.host  # the URL itself may hold tokens: log the host only
        attempt = int(await self.redis.hincrby(self.names.webhook(request_id), "attempts", 1))
        try:
            why = await self._attempt(target, request_id, attempt, payload, await self.secret_for(tenant))
        except WebhookRefused as e:  # the name resolves to a refused address now
            log.warning("webhook for %s dropped: %s", request_id, e.message, extra=extra)
            await self._finish(request_id)
            return
        if why is None:
            log.info("webhook for %s delivered (attempt %d)", request_id, attempt, extra=extra)
            await self._finish(request_id)
        elif attempt >= self.config.max_attempts:
            log.error("webhook for %s given up after %d attempts: %s", request_id, attempt, why, extra=extra)
            await self._finish(request_id)
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
            await self._finish(request_id, due_in_s=delay * random.uniform(0.9, 1.1))

    async def _attempt(
        self, target: Target, request_id: str, attempt: int, payload: bytes, secret: bytes
    ) -> str | None:
        """One attempt, all of it within ``timeout_s``: None on a 2xx answer, else why not."""
        timestamp = int(time.time())
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "X-Webhook-Timestamp": str(timestamp),
            "X-Webhook-Signature": sign(secret, payload, timestamp),
            "X-Request-ID": request_id,
            "X-Webhook-Attempt": str(attempt),
            "User-Agent": "agentpool-webhooks",
        }
        try:
            async with asyncio.timeout(self.config.timeout_s):
                try:
                    addresses = await resolve(target)
                except OSError as e:  # incl. the lookup's own timeout
                    return f"lookup of {target.host} failed: {e or type(e).__name__}"
                check_addresses(target, addresses)  # WebhookRefused: the caller drops the delivery
                for address in addresses[:-1]:  # connect to what was checked, nothing else
                    with contextlib.suppress(httpx.ConnectError):
                        status = await self._post(target, address, headers, payload)
                        break
                else:
                    status = await self._post(target, addresses[-1], headers, payload)
        except TimeoutError:
            return f"no complete answer within {self.config.timeout_s:g}s"
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            return type(e).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def _post(self, target: Target, address: str, headers: dict[str, str], payload: bytes) -> int:
        """POST to ``address``, naming the URL's host in Host and TLS SNI (so the certificate is
        checked against it); the status, once the whole answer is in."""
        assert self._http is not None
        url = httpx.URL(scheme=target.scheme, host=address, port=target.port, raw_path=target.target)
        tls_name = {"sni_hostname": target.host} if target.scheme == "https" and not target.is_ip else {}
        request = self._http.build_request("POST", url, content=payload, headers=headers, extensions=tls_name)
        response = await self._http.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > MAX_ANSWER_BYTES:
                    break
        finally:
            await response.aclose()
        return response.status_code

    async def _finish(self, request_id: str, due_in_s: float | None = None) -> None:
        """Give the lease up: the delivery is due again in ``due_in_s``, or forgotten (None)."""
        due = "" if due_in_s is None else str(_ms(time.time() + due_in_s))
        keys = [self._due, self._leases, self.names.webhook(request_id)]
        if not await self._settle(keys=keys, args=[request_id, self._token, due]):
            log.info(
                "webhook for %s: lease lost before it was settled",
                request_id,
                extra={"request_id": request_id},
            )
