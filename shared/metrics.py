"""Every agentpool metric, defined once; the rest of the code calls the small hooks below.

Names are ``agentpool_<thing>_<unit>``; labels are low-cardinality only (pool, deployment,
provider, model, outcome, tier, error_code), never request or thread ids. A process records into
prometheus-client's default registry; a worker under ``agentpool workers`` records into its
supervisor's ``PROMETHEUS_MULTIPROC_DIR`` instead (prometheus-client reads that variable when it is
imported), and the supervisor serves the sum of its workers on one endpoint.

``configure(False)`` (``AGENTPOOL_METRICS=0``) turns every hook into a no-op, so the overhead
benchmark can compare the two.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# LLM latencies run from milliseconds (a cached fake) to minutes (long generations).
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
WARMUP_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TIERS = ("sticky", "spill", "overflow", "queued", "rejected")
PD = ("pool", "deployment")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Every metric a gateway, client or worker process records, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._gateway(registry)
        self._requests(registry)
        self._replicas(registry)
        self._providers(registry)
        self._config(registry)

    def _gateway(self, r: CollectorRegistry) -> None:
        self.routed = Counter(
            "agentpool_requests_routed",
            "Requests published by routing tier; tier=rejected is a 503 POOL_SATURATED",
            ("pool", "tier"),
            registry=r,
        )
        self.sse_open = Gauge(
            "agentpool_gateway_sse_streams_open",
            "SSE reply streams the gateway is sending now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reader_lag = Gauge(
            "agentpool_reply_reader_lag_seconds",
            "Age of the newest reply entry when the reply reader got it (last read)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.stream_gaps = Counter(
            "agentpool_reply_stream_gaps",
            "Reply streams found missing entries (Redis lost its newest writes) and repaired with a "
            "restart event and the whole text",
            registry=r,
        )
        self.redis_persistence = Gauge(
            "agentpool_redis_persistence",
            "1: Redis keeps writes across a restart (AOF, or RDB snapshots); 0: a restart loses threads, "
            "keys and pending work; -1: unknown (CONFIG GET refused)",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.pool_ready = Gauge(
            "agentpool_pool_replicas_ready",
            "Replicas of the pool ready per the heartbeats this process sees",
            ("pool",),
            registry=r,
            multiprocess_mode="livemax",
        )

    def _requests(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "agentpool_requests",
            "Requests a replica finished, by outcome (end, error, interrupt, duplicate, skipped, parked)",
            (*PD, "outcome"),
            registry=r,
        )
        self.request_errors = Counter(
            "agentpool_request_errors",
            "Requests that ended with an error event or were skipped, by error code",
            (*PD, "error_code"),
            registry=r,
        )
        self.duration = Histogram(
            "agentpool_request_duration_seconds",
            "Published to end written, for answered requests",
            PD,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "agentpool_queue_wait_seconds",
            "Published to a replica starting it, for answered requests",
            PD,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "agentpool_time_to_first_token_seconds",
            "Replica start to the provider's first token, for answered requests",
            PD,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "agentpool_in_flight",
            "Requests replicas are running now",
            PD,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_ready = Gauge(
            "agentpool_queue_ready",
            "Requests waiting in replica queues (per heartbeat)",
            PD,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.redeliveries = Counter(
            "agentpool_redeliveries",
            "Requests begun again (attempt > 1) after a replica died or gave them back",
            PD,
            registry=r,
        )
        self.rescues = Counter(
            "agentpool_rescues",
            "Requests that reached a replica through the pool's "
            "shared queue after waiting too long in a replica queue",
            PD,
            registry=r,
        )

    def _replicas(self, r: CollectorRegistry) -> None:
        self.warmup = Histogram(
            "agentpool_replica_warmup_seconds",
            "Replica process start to ready (connect, declare, warm the provider)",
            PD,
            buckets=WARMUP_BUCKETS_S,
            registry=r,
        )
        self.build = Histogram(
            "agentpool_agent_build_seconds",
            "Building a replica's agent at warm-up: tools connected, the python factory run",
            PD,
            buckets=WARMUP_BUCKETS_S,
            registry=r,
        )
        self.tool_calls = Counter(
            "agentpool_tool_calls",
            "Tool calls the agents ran, by outcome (ok, or the tool_result's error_code)",
            (*PD, "outcome"),
            registry=r,
        )
        self.tool_duration = Histogram(
            "agentpool_tool_duration_seconds",
            "Tool call durations, every outcome",
            PD,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.cold_starts = Counter(
            "agentpool_replica_cold_starts",
            "Replicas that started and warmed (first start, restart or scale-up)",
            PD,
            registry=r,
        )

    def _providers(self, r: CollectorRegistry) -> None:
        pdp = (*PD, "provider")
        self.provider_errors = Counter(
            "agentpool_provider_errors",
            "Failed provider calls (retried or final), by error code",
            (*pdp, "error_code"),
            registry=r,
        )
        self.retries = Counter(
            "agentpool_provider_retries",
            "Provider calls retried, by the error that caused the retry",
            (*pdp, "error_code"),
            registry=r,
        )
        self.tokens_in = Counter(
            "agentpool_input_tokens", "Prompt tokens sent to providers", (*pdp, "model"), registry=r
        )
        self.tokens_out = Counter(
            "agentpool_output_tokens", "Tokens generated by providers", (*pdp, "model"), registry=r
        )

    def _config(self, r: CollectorRegistry) -> None:
        """The pools config in force (broker/config_source.py): where from, which version, refusals."""
        self.config_info = Gauge(
            "agentpool_config_info",
            "1 for the pools config this process runs: its source (api, redis, file) and version",
            ("source", "version"),
            registry=r,
            multiprocess_mode="liveall",
        )
        self.config_errors = Counter(
            "agentpool_config_errors",
            "Config fetches or reloads refused: the API unreachable or not 200, or an invalid document",
            registry=r,
        )
        self.config_loaded = Gauge(
            "agentpool_config_loaded_timestamp_seconds",
            "When this process took the config it runs (unix s)",
            registry=r,
            multiprocess_mode="liveall",
        )


@dataclass
class Fleet:
    """What a supervisor knows about its replicas; :class:`FleetCollector` reads it at scrape time."""

    desired: dict[tuple[str, str], int] = field(default_factory=dict)
    running: dict[tuple[str, str], int] = field(default_factory=dict)
    exits: dict[tuple[str, str], int] = field(default_factory=dict)


class FleetCollector(Collector):
    """Replica counts from a :class:`Fleet`: read when scraped, so the supervisor keeps no metric state."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        desired = GaugeMetricFamily(
            "agentpool_replicas_desired",
            "Replicas a deployment should have (Redis desired count, else the pools file)",
            labels=PD,
        )
        actual = GaugeMetricFamily(
            "agentpool_replicas_actual", "Replica processes this supervisor has running", labels=PD
        )
        exits = CounterMetricFamily(
            "agentpool_replica_exits",
            "Replica processes that exited unexpectedly (the supervisor restarts them)",
            labels=PD,
        )
        yield _filled(desired, self.fleet.desired)
        yield _filled(actual, self.fleet.running)
        yield _filled(exits, self.fleet.exits)


def _filled(family: GaugeMetricFamily | CounterMetricFamily, values: Mapping[tuple[str, str], int]) -> Metric:
    for labels, value in dict(values).items():  # a copy: the supervisor's loop writes while we read
        family.add_metric(list(labels), value)
    return family


class _State:
    enabled = True
    metrics: Metrics | None = None


_state = _State()


def configure(enabled: bool) -> None:
    """Turn recording on or off for this process (``AGENTPOOL_METRICS``); called once at start."""
    _state.enabled = enabled


def enabled() -> bool:
    return _state.enabled


def get() -> Metrics | None:
    """This process's metrics, built on first use; None while disabled."""
    if not _state.enabled:
        return None
    if _state.metrics is None:
        _state.metrics = Metrics(REGISTRY)
    return _state.metrics


# --- hooks for the gateway and the client
def routed(pool: str, tier: str) -> None:
    """A request was published (sticky, spill, overflow, queued) or refused with 503 (rejected)."""
    m = get()
    if m is not None:
        m.routed.labels(pool, tier).inc()


def sse_streams(delta: int) -> None:
    m = get()
    if m is not None:
        m.sse_open.inc(delta)


def reader_lag(seconds: float) -> None:
    m = get()
    if m is not None:
        m.reader_lag.set(seconds)


def stream_gap() -> None:
    m = get()
    if m is not None:
        m.stream_gaps.inc()


def redis_persistence(value: int) -> None:
    m = get()
    if m is not None:
        m.redis_persistence.set(value)


def pool_ready(pool: str, replicas: int) -> None:
    m = get()
    if m is not None:
        m.pool_ready.labels(pool).set(replicas)


# --- hooks for the config source (broker/config_source.py)
def config_loaded(source: str, version: str, at: float) -> None:
    m = get()
    if m is not None:
        if not os.environ.get(MULTIPROC_ENV):  # a worker's: set once (it cannot clear there)
            m.config_info.clear()  # one series: the config in force now
        m.config_info.labels(source, version).set(1)
        m.config_loaded.set(at)


def config_error() -> None:
    m = get()
    if m is not None:
        m.config_errors.inc()


# --- exposition
def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The text format of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_registry() -> CollectorRegistry:
    """What a process serves: its own registry, or the multiprocess directory's sum when it has one."""
    path = os.environ.get(MULTIPROC_ENV)
    return multiprocess_registry(path) if path else REGISTRY


def multiprocess_registry(path: str, *extra: Collector) -> CollectorRegistry:
    """A registry summing every process that writes to ``path``, plus ``extra`` collectors."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    for c in extra:
        registry.register(c)
    return registry


@dataclass
class Endpoint:
    """A running ``/metrics`` HTTP server (a daemon thread); ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(port: int, addr: str, registry: CollectorRegistry) -> Endpoint:
    """Serve ``registry`` on ``addr:port`` (0 = any free port) from a thread, off the event loop."""
    server, thread = start_http_server(port, addr, registry=registry)
    return Endpoint(server, thread)


def sample_names(registry: CollectorRegistry | None = None) -> set[str]:
    """Every sample name agentpool can expose (``_total``, ``_bucket``... included); for checks."""
    if registry is None:
        registry = CollectorRegistry()
        Metrics(registry)
        registry.register(FleetCollector(Fleet()))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in registry.collect() for s in suffixes.get(f.type, ("",))}
