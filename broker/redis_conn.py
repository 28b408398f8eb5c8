"""Redis connections, with redis-py's errors translated in one place."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentpool.shared.errors import Unavailable
from agentpool.shared.settings import redact_url

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)

log = logging.getLogger("agentpool.redis")


POOL_WAIT_S = 5.0  # a command waits this long for a free pooled connection before it fails


def connect(
    url: str, *, max_connections: int = 64, single_connection_client: bool = False, **kwargs: object
) -> aredis.Redis:
    """A pooled client; hiredis parses replies when installed (it is a dependency).

    The pool blocks: with more commands in flight than ``max_connections`` (256 concurrent asks
    through one gateway do that), a command waits for a connection instead of failing at once
    with ``MaxConnectionsError``, which redis-py's default pool raises.
    """
    # A Redis restart leaves every pooled connection dead. health_check_interval: one idle for 5 s
    # is PINGed before use; retry: a command that meets a dead connection (one used within those
    # 5 s) runs once more, at once, on a new one, instead of failing with 503. Only connection
    # errors are retried (a timeout is not: it would double the wait). A write whose reply was lost
    # can then apply twice; the one that matters, a duplicated reply chunk, breaks the chunk count
    # and the reader sends the whole text instead (see streams.Subscription.offer).
    options: dict[str, object] = {
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 5,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        **kwargs,
    }
    if single_connection_client:
        return aredis.Redis.from_url(url, single_connection_client=True, **options)  # type: ignore[arg-type]
    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **options
    )
    return aredis.Redis.from_pool(pool)


def redis_unavailable(url: str, exc: BaseException | None = None) -> Unavailable:
    why = f": {exc}" if exc else ""
    return Unavailable(
        "Redis is not reachable",
        error_code="REDIS_UNAVAILABLE",
        retry_after_s=2,
        internal=f"{redact_url(url)}{why}",
    )


@contextlib.contextmanager
def translated(url: str) -> Iterator[None]:
    """Turn redis-py connection errors into :class:`Unavailable` (``REDIS_UNAVAILABLE``)."""
    try:
        yield
    except REDIS_ERRORS as e:
        raise redis_unavailable(url, e) from e


VOLATILE_LOSES = (
    "thread history, API keys, idempotency claims, pending webhooks, paused runs and desired replica counts"
)


async def check_persistence(r: aredis.Redis, url: str, who: str) -> int:
    """Does Redis keep writes across a restart? 1: append-only file on; 0: off (warned, loudly);
    -1: unknown (``CONFIG GET`` refused, as managed Redis services do). Sets the metric too."""
    from agentpool.shared import metrics

    try:
        aof = await r.config_get("appendonly")
        save = await r.config_get("save")
    except redis.exceptions.ResponseError:
        metrics.redis_persistence(-1)
        log.info(
            "%s: Redis at %s does not allow CONFIG GET; make sure it runs with appendonly yes",
            who,
            redact_url(url),
        )
        return -1
    value = 1 if _value(aof, "appendonly") == "yes" else 0
    metrics.redis_persistence(value)
    if not value:
        snapshots = _value(save, "save")
        log.warning(
            "%s: Redis at %s runs without an append-only file (appendonly no, save %r): a restart loses "
            "%s%s. Run it with deploy/redis/redis.conf (appendonly yes, appendfsync everysec).",
            who,
            redact_url(url),
            snapshots,
            VOLATILE_LOSES,
            " written since the last snapshot" if snapshots else "",
        )
    return value


def _value(reply: object, name: str) -> str:
    raw = reply.get(name, reply.get(name.encode(), "")) if isinstance(reply, dict) else ""
    return raw.decode() if isinstance(raw, bytes) else str(raw)
