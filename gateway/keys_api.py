"""Key and webhook-secret endpoints (scope ``admin``), each acting within the caller's own tenant."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from agentpool.gateway.auth import Authenticator, require
from agentpool.gateway.http import JSON
from agentpool.gateway.keys import KEY_ID, KeyStore
from agentpool.gateway.schemas import KeyList, Revoked, WebhookSecret
from agentpool.gateway.webhooks import Deliverer
from agentpool.shared.errors import NotFound


async def list_keys(request: Request) -> Response:
    """The tenant's API keys (ids, scopes, source; never the keys or their hashes)."""
    principal = await require(request, "admin")
    auth: Authenticator = request.app.state.auth
    keys = [k for k in auth.config_infos() if k.tenant == principal.tenant]
    keys += await auth.store.list(principal.tenant)
    return JSON(KeyList(keys=keys))


async def revoke_key(request: Request) -> Response:
    """Revoke one of the tenant's keys; effective for the very next request."""
    principal = await require(request, "admin")
    store: KeyStore = request.app.state.auth.store
    key_id = request.path_params["key_id"]
    found = await store.get(key_id) if KEY_ID.match(key_id) else None
    if found is None or found[1].tenant != principal.tenant:
        raise NotFound(f"no API key {key_id!r}", error_code="KEY_NOT_FOUND", details={"key_id": key_id})
    await store.revoke(key_id)
    return JSON(Revoked(id=key_id))


async def webhook_secret(request: Request) -> Response:
    """The secret receivers use to verify ``X-Webhook-Signature``."""
    principal = await require(request, "admin")
    deliverer: Deliverer = request.app.state.webhooks
    secret = await deliverer.secret_for(principal.tenant)
    return JSON(WebhookSecret(tenant=principal.tenant, secret=secret.decode()))
