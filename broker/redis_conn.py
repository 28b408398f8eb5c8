"""Redis connections, with redis-py's errors translated in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.asyncio as aredis
import redis.exceptions

from shared.errors import Unavailable
from shared.settings import redact_url

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def connect(url: str, *, max_connections: int = 64, **kwargs: object) -> aredis.Redis:
    """A pooled client; hiredis parses replies when installed (it is a dependency)."""
    options: dict[str, object] = {"socket_timeout": 10, "socket_connect_timeout": 5, **kwargs}
    return aredis.Redis.from_url(url, max_connections=max_connections, **options)  # type: ignore[arg-type]


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
