"""Process runner for one replica: event loop, signals, exit codes.

First SIGTERM/SIGINT: drain gracefully. Second: exit at once (code 130).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvloop

from agentpool.shared import metrics
from agentpool.shared.config import Config
from agentpool.shared.settings import Settings
from agentpool.workers.providers import preload
from agentpool.workers.runtime import DRAIN_TIMEOUT_S, Worker
from agentpool.workers.slots import replica_slot

log = logging.getLogger("agentpool.worker")

EXIT_OK = 0
EXIT_HARD = 130


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(EXIT_HARD)
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def run_worker(
    settings: Settings,
    config: Config,
    pool: str,
    deployment: str,
    n: int | None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        # n None = `--replica auto`: claim a free slot; see workers/slots.py
        async with replica_slot(settings, config, pool, deployment, n, stop) as (cfg, slot):
            worker = Worker(settings, cfg, pool, deployment, slot)
            await worker.async_run(stop, drain_timeout_s)

    # Outside a supervisor a replica may serve its own metrics; under one, the supervisor serves them all.
    endpoint = None
    if metrics_port is not None and metrics.enabled():
        endpoint = metrics.serve(metrics_port, metrics_host, metrics.process_registry())
    try:
        uvloop.run(main())
    finally:
        if endpoint is not None:
            endpoint.close()
    return EXIT_OK


def run_standby(settings: Settings, config: Config, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """``agentpool worker --standby``: import what a replica of this pools file needs, then wait.

    The supervisor writes one line ``pool<TAB>deployment<TAB>n`` on stdin when it needs that replica
    started, and this process becomes it; end of input (the supervisor is gone) exits quietly.
    """
    kinds = sorted({p.kind for p in config.providers.values()})
    for kind in kinds:
        preload(kind)
    if any(at.mcp_servers for at in config.agent_types.values()):
        import agentpool.workers.tools.mcp  # noqa: F401  # the mcp SDK, for a replica that connects servers
    log.debug("standby ready: the runtime and the %s providers are imported", ", ".join(kinds))
    line = sys.stdin.readline()
    if not line.strip():
        return EXIT_OK
    pool, deployment, n = line.rstrip("\n").split("\t")
    return run_worker(settings, config, pool, deployment, int(n), drain_timeout_s)
