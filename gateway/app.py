"""The ASGI app: ``create_app()`` wires routes, error handling and the client's lifespan.

The config can change while the gateway runs (broker/config_source.py: a config API it polls,
``agentpool reload``, SIGHUP): :func:`_apply` swaps it in. Pools, deployments, routing, limits, rate
limits and webhook URL rules follow at once; bootstrap ``api_keys`` and the webhook secret are read
from the environment at start, so changes to them apply when the gateway restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import redis.exceptions
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.config_source import ConfigSource
from agentpool.broker.redis_conn import redis_unavailable
from agentpool.gateway import admin, anthropic_compat, dashboard, external, openai_compat, routes, shapes
from agentpool.gateway.http import error_response, on_client_gone
from agentpool.shared.config import Config
from agentpool.shared.errors import AgentPoolError, BadRequest, NotFound
from agentpool.shared.settings import Settings

log = logging.getLogger("agentpool.gateway")


def create_app(
    settings: Settings | None = None, config: Config | None = None, source: ConfigSource | None = None
) -> Starlette:
    """The gateway, on ``source``'s config (see broker/config_source.py), else ``config``, else the
    pools file; with a config URL and neither, the config is fetched as the app starts."""
    settings = settings or Settings.from_env()
    source = source or ConfigSource(settings, config)
    if not source.ready and settings.config_url is None:
        source.load_file()
    # env vars named by the pools file: a missing one fails here, at creation, when it can
    prepared = external.prepare(source.config) if source.ready else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        config = await source.initial()
        app.state.config = config
        async with AgentPoolClient(settings, config) as client:
            app.state.client = client
            app.state.views = dashboard.Views(client)
            async with (
                external.lifespan(app, client, settings, prepared or external.prepare(config)),
                source.running(client.redis, functools.partial(_apply, app)),
            ):
                yield

    app = Starlette(
        routes=[
            Route("/v1/ask/{pool}", routes.ask, methods=["POST"]),
            Route("/v1/groups/{group}/ask", shapes.group_ask, methods=["POST"]),
            Route("/v1/groups/{group}", shapes.group_status, methods=["GET"]),
            Route("/v1/agents/{agent_id}/ask", shapes.agent_ask, methods=["POST"]),
            Route("/v1/requests/{request_id}", routes.request_resource, methods=["GET", "DELETE"]),
            Route("/v1/requests/{request_id}/resume", routes.resume, methods=["POST"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics_text, methods=["GET"]),
            Route("/v1/chat/completions", openai_compat.chat_completions, methods=["POST"]),
            Route("/v1/messages", anthropic_compat.messages, methods=["POST"]),
            Route("/v1/models", openai_compat.list_models, methods=["GET"]),
            Route("/v1/models/{model}", openai_compat.get_model, methods=["GET"]),
            *admin.ROUTES,
            *dashboard.ROUTES,
            *external.ROUTES,
        ],
        lifespan=lifespan,
        exception_handlers={
            AgentPoolError: _on_error,
            HTTPException: _on_http_error,
            redis.exceptions.ConnectionError: _on_redis_error,
            redis.exceptions.TimeoutError: _on_redis_error,
            ClientDisconnect: on_client_gone,
        },
    )
    app.state.settings = settings
    app.state.config = source.config if source.ready else None  # the one in force (swapped by _apply)
    app.state.config_source = source
    app.state.closing = asyncio.Event()  # set when the server begins to stop (gateway/server.py)
    return app


async def _apply(app: Starlette, config: Config) -> None:
    """Serve ``config`` from now on (see the module's docstring for what waits for a restart)."""
    st = app.state
    old: Config = st.config
    await st.client.apply_config(config)
    st.config = config
    st.webhooks.config = config.webhooks  # URL rules, timeouts, retries (its connection cap: at restart)
    if old.api_keys != config.api_keys or old.webhooks.secret_env != config.webhooks.secret_env:
        log.warning("the config's api_keys or webhooks.secret_env changed: that applies at the next restart")


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AgentPoolError)
    return error_response(exc, getattr(request.state, "rate_headers", None))  # set once rate-limited


async def _on_redis_error(request: Request, exc: Exception) -> Response:
    """Redis lost (or its pool exhausted) mid-handler: a 503 to retry, never a 500."""
    return error_response(redis_unavailable(request.app.state.settings.redis_url, exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: AgentPoolError = NotFound(f"no route {request.method} {request.url.path}")
    else:
        err = BadRequest(
            str(exc.detail), error_code="METHOD_NOT_ALLOWED" if exc.status_code == 405 else "BAD_REQUEST"
        )
        err.status = exc.status_code
    headers = dict(exc.headers or {})
    if "Allow" in headers:  # Starlette joins a set: the same methods in a stable order
        headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
    return error_response(err, headers)  # a 405's Allow
