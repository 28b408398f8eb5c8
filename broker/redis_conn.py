"""Redis connections, with redis-py's errors translated in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.asyncio as aredis
import redis.exceptions

from agentpool.shared.errors import Unavailable
from agentpool.shared.settings import redact_url

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


POOL_WAIT_S = 5.0  # a command waits this long for a free pooled connection before it fails


def connect(
    url: str, *, max_connections: int = 64, single_connection_client: bool = False, **kwargs: object
) -> aredis.Redis:
    """A pooled client; hiredis parses replies when installed (it is a dependency).

    The pool blocks: with more commands in flight than ``max_connections`` (256 concurrent asks
    through one gateway do that), a command waits for a connection instead of failing at once
    with ``MaxConnectionsError``, which redis-py's default pool raises.
    """
    options: dict[str, object] = {"socket_timeout": 10, "socket_connect_timeout": 5, **kwargs}
    if single_connection_client:
        return aredis.Redis.from_url(url, single_connection_client=True, **options)  # type: ignore[arg-type]
    pool = aredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **options
    )
    return aredis.Redis.from_pool(pool)


def redis_unavailable(url: str, exc: BaseException | None = None) -> Unavailable:
    why = f": {exc}" if exc else ""
    return Unavailable(
        f"Redis is not reachable at {redact_url(url)}{why}",
        error_code="REDIS_UNAVAILABLE",
        retry_after_s=2,
    )


@contextlib.contextmanager
def translated(url: str) -> Iterator[None]:
    """Turn redis-py connection errors into :class:`Unavailable` (``REDIS_UNAVAILABLE``)."""
    try:
        yield
    except REDIS_ERRORS as e:
        raise redis_unavailable(url, e) from e
