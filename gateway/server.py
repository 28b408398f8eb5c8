"""Serving the gateway with uvicorn (uvloop + httptools, bounded by gateway/guard.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn

from agentpool.gateway.app import create_app
from agentpool.gateway.guard import guarded
from agentpool.shared.config import Config
from agentpool.shared.settings import Settings


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host (``agentpool dev``, tests)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server(
    settings: Settings, config: Config, host: str, port: int, *, embedded: bool = False
) -> uvicorn.Server:
    app = create_app(settings, config)
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
    return (EmbeddedServer if embedded else uvicorn.Server)(cfg)


def run_gateway(settings: Settings, config: Config, host: str, port: int) -> int:
    server(settings, config, host, port).run()
    return 0
