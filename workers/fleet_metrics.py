"""The supervisor's one metrics endpoint: the sum of its workers' metrics, plus replica counts.

Workers write their metrics into a fresh ``PROMETHEUS_MULTIPROC_DIR`` that only this supervisor's
children share (prometheus-client multiprocess mode), and the endpoint merges the files at scrape
time. When a worker exits, ``mark_process_dead`` drops its live gauges (in flight, queued), so a
killed worker's in-flight count does not linger in the sum; its counters and histograms stay, as
totals should. The directory goes away with the supervisor.
"""

from __future__ import annotations

import logging
import shutil
import tempfile

from prometheus_client import multiprocess

from agentpool.shared import metrics

log = logging.getLogger("agentpool.supervisor")

DEFAULT_PORT = 9464


class FleetMetrics:
    def __init__(self, port: int | None, addr: str = "127.0.0.1") -> None:
        self.port = port  # None: no endpoint; 0: any free port (see .port once started)
        self.addr = addr
        self.fleet = metrics.Fleet()
        self.dir: str | None = None
        self._endpoint: metrics.Endpoint | None = None

    def start(self) -> None:
        if self.port is None or not metrics.enabled():
            return
        self.dir = tempfile.mkdtemp(prefix="agentpool-metrics-")
        registry = metrics.multiprocess_registry(self.dir, metrics.FleetCollector(self.fleet))
        self._endpoint = metrics.serve(self.port, self.addr, registry)
        self.port = self._endpoint.port
        log.info("metrics of every worker on http://%s:%d/metrics", self.addr, self.port)

    def env(self) -> dict[str, str]:
        """What a worker process needs to record into this supervisor's directory."""
        return {metrics.MULTIPROC_ENV: self.dir} if self.dir else {}

    def record(self, pool: str, deployment: str, desired: int, running: int) -> None:
        self.fleet.desired[(pool, deployment)] = desired
        self.fleet.running[(pool, deployment)] = running

    def exited(self, pool: str, deployment: str, pid: int, unexpected: bool) -> None:
        """A worker process is gone: drop its live gauges; count it if nobody asked it to stop."""
        if unexpected:
            key = (pool, deployment)
            self.fleet.exits[key] = self.fleet.exits.get(key, 0) + 1
        if self.dir:
            multiprocess.mark_process_dead(pid, self.dir)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
