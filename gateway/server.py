"""Serving the gateway with uvicorn (uvloop + httptools, bounded by gateway/guard.py)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from agentpool.broker.config_source import ConfigSource, reload_on_sighup
from agentpool.gateway.app import create_app
from agentpool.gateway.guard import guarded
from agentpool.shared.config import Config
from agentpool.shared.settings import Settings


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host (``agentpool dev``, tests)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer(uvicorn.Server):
    """``agentpool gateway``: uvicorn's SIGINT/SIGTERM handling, and SIGHUP re-reads the config."""

    def __init__(self, config: uvicorn.Config, source: ConfigSource) -> None:
        super().__init__(config)
        self.source = source

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
                yield
                return
            undo = reload_on_sighup(self.source)
            try:
                yield
            finally:
                undo()


def server(
    settings: Settings,
    config: Config | None,
    host: str,
    port: int,
    *,
    embedded: bool = False,
    source: ConfigSource | None = None,
) -> uvicorn.Server:
    app = create_app(settings, config, source)
    cfg = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # httptools, bounded: head size, URL, head timeout, connections; on stop, endless streams end
        http=guarded(settings, app.state.closing.set),
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.keepalive_s,
        server_header=False,
    )
    if embedded:
        return EmbeddedServer(cfg)
    return GatewayServer(cfg, app.state.config_source)


def run_gateway(
    settings: Settings, config: Config | None, host: str, port: int, source: ConfigSource | None = None
) -> int:
    server(settings, config, host, port, source=source).run()
    return 0
