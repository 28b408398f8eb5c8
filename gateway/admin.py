"""Fleet admin API: desired replicas, pool status, rolling restart, fleet health.

    PUT  /v1/pools/{pool}/deployments/{deployment}  {"replicas": N}   scale (supervisors act at once)
    GET  /v1/pools                                   each pool: status, desired vs actual per deployment
    GET  /v1/pools/{pool}                            the pool and each of its replicas
    POST /v1/pools/{pool}/restart                    rolling restart, one replica at a time
    GET  /v1/health                                  pools, healthy pools, active/total requests, latency

Status comes from broker/fleet.py, the same computation ``agentpool status`` prints. These routes
need the ``admin`` scope (gateway/auth.py) and, like everything else, stay within the caller's
tenant: its pools (``tenant`` of a static pool; ``{pool}--{tenant}`` pools) are all it sees. The
fleet-wide view is ``agentpool status``, for operators with access to Redis.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentpool.broker.fleet import DeploymentStatus, Fleet, Health, PoolStatus
from agentpool.broker.leases import MAX_REPLICAS
from agentpool.broker.redis_conn import translated
from agentpool.gateway.auth import require
from agentpool.gateway.http import JSON, decode, read_body
from agentpool.shared.errors import NotFound

MAX_ADMIN_BODY_BYTES = 4096

Handler = Callable[[Request, Fleet, str], Awaitable[Response]]


class ScaleBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    replicas: Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)]


class PoolSummary(msgspec.Struct, kw_only=True):
    pool: str
    status: str
    asleep: bool
    deployments: list[DeploymentStatus]

    @classmethod
    def of(cls, s: PoolStatus) -> PoolSummary:
        return cls(pool=s.pool, status=s.status, asleep=s.asleep, deployments=list(s.deployments))


def admin(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The route: the caller must hold ``admin``; it gets its tenant; Redis errors become 503."""

    async def route(request: Request) -> Response:
        principal = await require(request, "admin")
        client = request.app.state.client
        with translated(client.settings.redis_url):
            return await handler(request, client.fleet, principal.tenant)

    route.__doc__ = handler.__doc__
    return route


async def _pools(fleet: Fleet, tenant: str) -> list[str]:
    """The tenant's pools that run replicas (static ones, and per-tenant ones made already)."""
    return [p for p in await fleet.pool_names() if (cfg := fleet.pool_config(p)) and cfg.tenant == tenant]


async def _known(fleet: Fleet, pool: str, tenant: str) -> str:
    """``pool`` if it is one of the tenant's; another tenant's pool looks exactly like no pool."""
    if pool not in await _pools(fleet, tenant):
        raise NotFound(f"no pool named {pool!r}", error_code="POOL_NOT_FOUND", details={"pool": pool})
    return pool


async def scale(request: Request, fleet: Fleet, tenant: str) -> Response:
    """Set a deployment's desired replicas (also wakes an idle pool)."""
    pool = await _known(fleet, request.path_params["pool"], tenant)
    deployment = request.path_params["deployment"]
    cfg = fleet.pool_config(pool)
    if cfg is None or deployment not in {d.name for d in cfg.deployments}:
        raise NotFound(
            f"pool {pool!r} has no deployment {deployment!r}",
            error_code="DEPLOYMENT_NOT_FOUND",
            details={"pool": pool, "deployment": deployment},
        )
    body = decode(await read_body(request, MAX_ADMIN_BODY_BYTES), ScaleBody)
    await fleet.set_desired(pool, deployment, body.replicas)
    return JSON({"pool": pool, "deployment": deployment, "replicas": body.replicas})


async def list_pools(request: Request, fleet: Fleet, tenant: str) -> Response:
    """Every pool of the tenant: status, and desired vs ready replicas per deployment."""
    return JSON({"pools": [PoolSummary.of(await fleet.status(p)) for p in await _pools(fleet, tenant)]})


async def get_pool(request: Request, fleet: Fleet, tenant: str) -> Response:
    """One pool with each of its live replicas."""
    return JSON(await fleet.status(await _known(fleet, request.path_params["pool"], tenant)))


async def restart(request: Request, fleet: Fleet, tenant: str) -> Response:
    """Rolling restart: supervisors replace the pool's replicas one at a time."""
    pool = await _known(fleet, request.path_params["pool"], tenant)
    return JSON({"pool": pool, "restart_generation": await fleet.restart(pool)}, status_code=202)


async def health(request: Request, fleet: Fleet, tenant: str) -> Response:
    """Totals over the tenant's pools: pools, healthy ones, active and total requests, avg response."""
    return JSON(Health.of([await fleet.status(p) for p in await _pools(fleet, tenant)]))


ROUTES = [
    Route("/v1/pools", admin(list_pools), methods=["GET"]),
    Route("/v1/pools/{pool}", admin(get_pool), methods=["GET"]),
    Route("/v1/pools/{pool}/deployments/{deployment}", admin(scale), methods=["PUT"]),
    Route("/v1/pools/{pool}/restart", admin(restart), methods=["POST"]),
    Route("/v1/health", admin(health), methods=["GET"]),
]
