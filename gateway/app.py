"""The ASGI app: ``create_app()`` wires routes, error handling and the client's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.exceptions
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.redis_conn import redis_unavailable
from agentpool.gateway import admin, anthropic_compat, dashboard, external, openai_compat, routes, shapes
from agentpool.gateway.http import error_response, on_client_gone
from agentpool.shared.config import Config, load_config
from agentpool.shared.errors import AgentPoolError, BadRequest, NotFound
from agentpool.shared.settings import Settings


def create_app(settings: Settings | None = None, config: Config | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    config = config or load_config(settings.config_path)
    prepared = external.prepare(config)  # env vars named by the pools file

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AgentPoolClient(settings, config) as client:
            app.state.client = client
            app.state.views = dashboard.Views(client)
            async with external.lifespan(app, client, settings, prepared):
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
    app.state.config = config
    app.state.closing = asyncio.Event()  # set when the server begins to stop (gateway/server.py)
    return app


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
