"""Per-pool history for the dashboard's charts: 15 minutes of 5-second buckets, kept in Redis.

Every process that sees a request end or get refused counts it here and flushes about once a
second, so every gateway draws the same picture: a worker counts what it answered (requests,
errors, tokens, a latency histogram), a client or gateway counts what it refused (503 when the
pool is saturated, 429 over a rate limit). One bucket is one hash, ``hist:{pool}:{start}``:

    n    requests ended (answered, failed or paused)     e    of them, errors
    tok  tokens in + out                                 r503 / r429   refused
    l{i} requests whose latency fell in bucket i of :data:`LATENCY_BOUNDS_MS`

and the same per deployment, for an A/B's arms: ``@{deployment}:n``, ``:e``, ``:ti`` / ``:to``
(tokens in, out) and ``:l{i}``. The ``@`` keeps them apart from the pool's fields (a deployment
name never holds one), so a reader that knows only those ignores them. :func:`traffic` sums a
pool's last :data:`RECENT_S` per deployment, for ``GET /v1/pools/{pool}``.

``HINCRBY`` from any number of processes adds up exactly; each hash expires a little after the
window, so the history cleans itself up. Percentiles come from the merged latency buckets (their
bounds are 25 % apart, so a percentile is within that of the truth); they are not averages of
averages.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from typing import cast

import msgspec
import redis.asyncio as aredis

from agentpool.shared.messages import Usage
from agentpool.shared.names import Names

BUCKET_S = 5
WINDOW_S = 15 * 60
KEEP_S = WINDOW_S + 60
RECENT_S = 5 * 60  # the window of the per-deployment figures in the pool status
# 1 ms .. ~10 min, each bound 25 % above the one before
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(round(1.25**i, 3) for i in range(61))


def bucket_of(t: float) -> int:
    return int(t // BUCKET_S) * BUCKET_S


def latency_index(ms: float) -> int:
    return min(bisect.bisect_left(LATENCY_BOUNDS_MS, ms), len(LATENCY_BOUNDS_MS) - 1)


class Recorder:
    """Counts in this process, written to Redis by :meth:`flush` (one pipeline for all of them)."""

    def __init__(self, redis: aredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        self._pending: dict[tuple[str, int], Counter[str]] = {}

    def _counts(self, pool: str, at: float | None) -> Counter[str]:
        key = (pool, bucket_of(time.time() if at is None else at))
        found = self._pending.get(key)
        if found is None:
            found = self._pending[key] = Counter()
        return found

    def ended(
        self,
        pool: str,
        deployment: str,
        latency_ms: float,
        error: bool,
        usage: Usage | None = None,
        at: float | None = None,
    ) -> None:
        """A request of ``pool`` answered (or failed, or paused) by a replica of ``deployment``."""
        c = self._counts(pool, at)
        tokens_in, tokens_out = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
        lat = f"l{latency_index(latency_ms)}"
        d = f"@{deployment}:"
        c["n"] += 1
        c[d + "n"] += 1
        c[lat] += 1
        c[d + lat] += 1
        if error:
            c["e"] += 1
            c[d + "e"] += 1
        if tokens_in or tokens_out:
            c["tok"] += tokens_in + tokens_out
            c[d + "ti"] += tokens_in
            c[d + "to"] += tokens_out

    def refused(self, pool: str, status: int, at: float | None = None) -> None:
        """A request of ``pool`` refused with 503 (saturated) or 429 (rate limit)."""
        self._counts(pool, at)[f"r{status}"] += 1

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        pipe = self.redis.pipeline(transaction=False)
        for (pool, bucket), counts in batch.items():
            key = self.names.history(pool, bucket)
            for field, n in counts.items():
                pipe.hincrby(key, field, n)
            pipe.expire(key, KEEP_S)
        try:
            await pipe.execute()
        except BaseException:
            for where, counts in batch.items():  # Redis away: keep the counts for the next flush
                self._pending.setdefault(where, Counter()).update(counts)
            raise


class Point(msgspec.Struct, array_like=True):
    """One bucket of one pool, as the dashboard draws it (``array_like``: a compact row)."""

    t: int  # bucket start, unix s
    rate: float  # requests ended per second
    p50_ms: float
    p99_ms: float
    error_rate: float  # errors / requests, 0..1
    r503: int
    r429: int
    tokens: int


def point(bucket: int, raw: dict[bytes, bytes], now: float) -> Point:
    counts = {k.decode(): int(v) for k, v in raw.items()}
    n = counts.get("n", 0)
    span = min(BUCKET_S, max(1.0, now - bucket))  # the bucket in progress covers less time so far
    lat = sorted((int(k[1:]), v) for k, v in counts.items() if k.startswith("l"))
    return Point(
        t=bucket,
        rate=round(n / span, 3),
        p50_ms=_percentile(lat, 0.50),
        p99_ms=_percentile(lat, 0.99),
        error_rate=round(counts.get("e", 0) / n, 4) if n else 0.0,
        r503=counts.get("r503", 0),
        r429=counts.get("r429", 0),
        tokens=counts.get("tok", 0),
    )


def _percentile(buckets: list[tuple[int, int]], q: float) -> float:
    """The upper bound of the latency bucket holding the ``q`` quantile (0 with no requests)."""
    total = sum(n for _, n in buckets)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for i, n in buckets:
        seen += n
        if seen >= rank:
            return LATENCY_BOUNDS_MS[i]
    return LATENCY_BOUNDS_MS[buckets[-1][0]]


async def read(
    redis: aredis.Redis, names: Names, pools: list[str], since: float, now: float | None = None
) -> dict[str, list[Point]]:
    """Each pool's points from the bucket holding ``since`` up to now, oldest first (one round trip)."""
    now = time.time() if now is None else now
    buckets = buckets_between(max(since, now - WINDOW_S), now)
    pipe = redis.pipeline(transaction=False)
    for pool in pools:
        for b in buckets:
            pipe.hgetall(names.history(pool, b))
    res = cast(list[dict[bytes, bytes]], await pipe.execute()) if pools else []
    out: dict[str, list[Point]] = {}
    for i, pool in enumerate(pools):
        rows = res[i * len(buckets) : (i + 1) * len(buckets)]
        out[pool] = [point(b, raw, now) for b, raw in zip(buckets, rows, strict=True)]
    return out


class Traffic(msgspec.Struct, kw_only=True):
    """One deployment's requests over the pool's last ``window_s``, as its replicas counted them."""

    window_s: int
    requests: int  # ended: answered, failed or paused
    share: float  # its requests / the pool's (every deployment's), 0..1: the split as measured
    errors: int
    error_rate: float  # errors / requests, 0..1
    p50_ms: float  # latency percentiles, each the upper bound of its bucket (within 25 %)
    p99_ms: float
    input_tokens: int
    output_tokens: int


def recent_buckets(now: float, window_s: int = RECENT_S) -> list[int]:
    """The buckets of the last ``window_s``, the one in progress included, oldest first."""
    return buckets_between(now - window_s + BUCKET_S, now)


def buckets_between(since: float, now: float) -> list[int]:
    """The buckets from the one holding ``since`` to the one in progress at ``now``, oldest first."""
    return list(range(bucket_of(since), bucket_of(now) + 1, BUCKET_S))


def traffic(
    rows: list[dict[bytes, bytes]], deployments: list[str], window_s: int = RECENT_S
) -> dict[str, Traffic]:
    """Per deployment, its counts summed over ``rows`` (the HGETALLs of :func:`recent_buckets`)."""
    per: dict[str, Counter[str]] = {}
    for raw in rows:
        for k, v in raw.items():
            field = k.decode()
            if field.startswith("@"):
                dep, _, name = field[1:].partition(":")
                per.setdefault(dep, Counter())[name] += int(v)
    total = sum(c["n"] for c in per.values())
    return {d: _traffic(per.get(d, Counter()), total, window_s) for d in deployments}


def _traffic(c: Counter[str], pool_requests: int, window_s: int) -> Traffic:
    n = c["n"]
    lat = sorted((int(k[1:]), v) for k, v in c.items() if k.startswith("l"))
    return Traffic(
        window_s=window_s,
        requests=n,
        share=round(n / pool_requests, 4) if pool_requests else 0.0,
        errors=c["e"],
        error_rate=round(c["e"] / n, 4) if n else 0.0,
        p50_ms=_percentile(lat, 0.50),
        p99_ms=_percentile(lat, 0.99),
        input_tokens=c["ti"],
        output_tokens=c["to"],
    )
