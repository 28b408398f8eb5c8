"""Wiring of the external-API hardening: auth, rate limits, idempotency, webhooks, OpenAPI.

``prepare()`` reads what comes from the environment (bootstrap keys, the webhook secret) when
the app is created, so a missing variable fails the start; ``lifespan()`` builds the Redis-backed
parts on the open client and starts the webhook loop; ``ROUTES`` are the endpoints added here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.routing import Route

from agentpool.broker.client import AgentPoolClient
from agentpool.broker.redis_conn import check_persistence
from agentpool.gateway import keys_api, openapi
from agentpool.gateway.auth import Authenticator, Principal, config_keys
from agentpool.gateway.background import Background
from agentpool.gateway.idempotency import Idempotency
from agentpool.gateway.keys import KeyStore
from agentpool.gateway.ratelimit import RateLimiter
from agentpool.gateway.webhooks import Deliverer, configured_secret
from agentpool.shared.config import Config
from agentpool.shared.settings import Settings

ROUTES = [
    Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    Route("/v1/keys", keys_api.list_keys, methods=["GET"]),
    Route("/v1/keys/{key_id}", keys_api.revoke_key, methods=["DELETE"]),
    Route("/v1/webhooks/secret", keys_api.webhook_secret, methods=["GET"]),
]


@dataclass(frozen=True, slots=True)
class Prepared:
    keys: list[tuple[str, Principal]]
    webhook_secret: bytes | None


def prepare(config: Config) -> Prepared:
    """Read the env vars the pools file names; a missing one raises ConfigError now."""
    return Prepared(config_keys(config.api_keys, os.environ), configured_secret(config.webhooks, os.environ))


@contextlib.asynccontextmanager
async def lifespan(
    app: Starlette,
    client: AgentPoolClient,
    settings: Settings,
    prepared: Prepared,
) -> AsyncIterator[None]:
    """Attach the parts to ``app.state`` for the handlers; stop the background work at the end."""
    st = app.state
    await check_persistence(client.redis, settings.redis_url, "gateway")
    st.auth = Authenticator(KeyStore(client.redis, client.names), prepared.keys, settings.auth)
    st.limiter = RateLimiter(client.redis, settings.redis_url)
    st.idempotency = Idempotency(client.redis, client.names)
    st.background = Background()
    st.webhooks = Deliverer(client, client.config.webhooks, prepared.webhook_secret)
    await st.webhooks.start()
    try:
        yield
    finally:
        await st.background.aclose()
        await st.webhooks.aclose()
