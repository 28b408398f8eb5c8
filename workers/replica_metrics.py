"""One replica's metric hooks, called by the worker runtime at lifecycle points.

Label children are bound once per replica because most hooks run once or twice per request. With
metrics off (``AGENTPOOL_METRICS=0``) every hook returns at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from agentpool.shared import metrics
from agentpool.shared.errors import ProviderError
from agentpool.shared.messages import Timings, ToolResult, Usage
from agentpool.workers.job import Outcome


@dataclass(frozen=True, slots=True)
class _Bound:
    in_flight: Gauge
    queue_ready: Gauge
    duration: Histogram
    queue_wait: Histogram
    ttft: Histogram
    tokens_in: Counter
    tokens_out: Counter
    redeliveries: Counter
    rescues: Counter
    tool_duration: Histogram


class ReplicaMetrics:
    def __init__(self, pool: str, deployment: str, provider: str, model: str) -> None:
        self.m = metrics.get()
        self.labels = (pool, deployment)
        self.provider = provider
        self._ready = 0
        self.b: _Bound | None = None
        if self.m is not None:
            pd, m = self.labels, self.m
            self.b = _Bound(
                m.in_flight.labels(*pd),
                m.queue_ready.labels(*pd),
                m.duration.labels(*pd),
                m.queue_wait.labels(*pd),
                m.ttft.labels(*pd),
                m.tokens_in.labels(*pd, provider, model),
                m.tokens_out.labels(*pd, provider, model),
                m.redeliveries.labels(*pd),
                m.rescues.labels(*pd),
                m.tool_duration.labels(*pd),
            )

    def warmed(self, warmup_ms: float) -> None:
        """The replica is ready: a cold start, paid before it took any request."""
        if self.m is not None:
            self.m.warmup.labels(*self.labels).observe(warmup_ms / 1000)
            self.m.cold_starts.labels(*self.labels).inc()

    def built(self, build_ms: float) -> None:
        """The agent was built (tools connected, factory run) during warm-up."""
        if self.m is not None:
            self.m.build.labels(*self.labels).observe(build_ms / 1000)

    def tool_result(self, result: ToolResult) -> None:
        """``ToolBox.on_result``: one tool call ran (or failed)."""
        if self.m is not None and self.b is not None:
            self.m.tool_calls.labels(*self.labels, result.error_code or "ok").inc()
            self.b.tool_duration.observe(result.duration_ms / 1000)

    def received(self, headers: Mapping[str, object] | None, redelivered: bool) -> None:
        """A delivery began; dead-lettered (``x-death``) means it was rescued from a replica queue."""
        if self.b is not None:
            self.b.in_flight.inc()
            if headers and "x-death" in headers and not redelivered:
                self.b.rescues.inc()

    def done(self) -> None:
        if self.b is not None:
            self.b.in_flight.dec()

    def queue_ready(self, n: int) -> None:
        """This replica's waiting messages; added as a delta so replicas sharing a process sum up."""
        if self.b is not None and n != self._ready:
            self.b.queue_ready.inc(n - self._ready)
            self._ready = n

    def redelivered(self) -> None:
        if self.b is not None:
            self.b.redeliveries.inc()

    def retried(self, error: ProviderError, attempt: int) -> None:
        """``on_retry`` of ``generate_with_retries``: a failed provider call that is tried again."""
        if self.m is not None:
            labels = (*self.labels, self.provider, error.error_code)
            self.m.retries.labels(*labels).inc()
            self.m.provider_errors.labels(*labels).inc()

    def outcome(self, outcome: Outcome) -> None:
        """``Worker.on_outcome``: counts, latencies and tokens of one finished request."""
        if self.m is None or self.b is None:
            return
        self._errors(outcome.kind, outcome.error_code)
        usage, timings = outcome.extra.get("usage"), outcome.extra.get("timings")
        if isinstance(usage, Usage):  # tokens were spent even when another attempt won the race
            self.b.tokens_in.inc(usage.input_tokens)
            self.b.tokens_out.inc(usage.output_tokens)
        if outcome.kind == "end":
            self.b.duration.observe(outcome.latency_ms / 1000)
            if isinstance(timings, Timings):
                self.b.queue_wait.observe(timings.queue_wait_ms / 1000)
                self.b.ttft.observe(timings.ttft_ms / 1000)
        self.m.requests.labels(*self.labels, outcome.kind).inc()

    def _errors(self, kind: str, code: str) -> None:
        assert self.m is not None
        if not code or kind == "duplicate":
            return
        self.m.request_errors.labels(*self.labels, code).inc()
        if code.startswith("PROVIDER_"):
            self.m.provider_errors.labels(*self.labels, self.provider, code).inc()
