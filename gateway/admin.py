"""Fleet admin API: desired replicas, pool status, rolling restart, fleet health.

    PUT  /v1/pools/{pool}/deployments/{deployment}  {"replicas": N}   scale (supervisors act at once)
    GET  /v1/pools                                   each pool: status, desired vs actual per deployment
    GET  /v1/pools/{pool}                            the pool, its replicas, each deployment's recent traffic
    POST /v1/pools/{pool}/restart                    rolling restart, one replica at a time
    POST /v1/pools/{pool}/agents/{agent_id}/drain    replace one replica: a new one starts, then it drains
    GET  /v1/health                                  pools, healthy pools, active/total requests, latency

Status comes from broker/fleet.py, the same computation ``agentpool status`` prints. These routes
need the ``admin`` scope (gateway/auth.py) and stay within the caller's tenant: its pools
(``tenant`` of a static pool; ``{pool}--{tenant}`` pools) are all it sees, another tenant's pool
looks like no pool. A key that also holds ``fleet`` (an operator's) sees and acts on every
tenant's pools, per-tenant pools included, as ``agentpool status`` does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentpool.broker.fleet import DeploymentStatus, Fleet, Health, PoolStatus
from agentpool.broker.redis_conn import translated
from agentpool.gateway.auth import Principal, require
from agentpool.gateway.http import JSON, decode, read_body
from agentpool.shared.config import MAX_REPLICAS_CAP
from agentpool.shared.errors import BadRequest, NotFound, StateConflict

MAX_ADMIN_BODY_BYTES = 4096

Handler = Callable[[Request, Fleet, Principal], Awaitable[Response]]


class ScaleBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    replicas: Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS_CAP)]


class PoolSummary(msgspec.Struct, kw_only=True):
    pool: str
    status: str
    asleep: bool
    deployments: list[DeploymentStatus]

    @classmethod
    def of(cls, s: PoolStatus) -> PoolSummary:
        return cls(pool=s.pool, status=s.status, asleep=s.asleep, deployments=list(s.deployments))


def admin(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The route: the caller must hold ``admin``; it gets the caller; Redis errors become 503."""

    async def route(request: Request) -> Response:
        principal = await require(request, "admin")
        client = request.app.state.client
        with translated(client.settings.redis_url):
            return await handler(request, client.fleet, principal)

    route.__doc__ = handler.__doc__
    return route


def fleet_wide(principal: Principal) -> bool:
    return "fleet" in principal.scopes


async def visible_pools(fleet: Fleet, principal: Principal) -> list[str]:
    """The pools the caller sees that run replicas (static ones, and per-tenant ones made already):
    its tenant's, or every tenant's for a ``fleet`` key."""
    everyone = fleet_wide(principal)
    return [
        p
        for p in await fleet.pool_names()
        if (cfg := fleet.pool_config(p)) and (everyone or cfg.tenant == principal.tenant)
    ]


async def _known(fleet: Fleet, pool: str, principal: Principal) -> str:
    """``pool`` if the caller sees it; another tenant's pool looks exactly like no pool."""
    if pool not in await visible_pools(fleet, principal):
        raise NotFound(f"no pool named {pool!r}", error_code="POOL_NOT_FOUND", details={"pool": pool})
    return pool


async def scale(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """Set a deployment's desired replicas (also wakes an idle pool)."""
    pool = await _known(fleet, request.path_params["pool"], principal)
    deployment = request.path_params["deployment"]
    cfg = fleet.pool_config(pool)
    if cfg is None or deployment not in {d.name for d in cfg.deployments}:
        raise NotFound(
            f"pool {pool!r} has no deployment {deployment!r}",
            error_code="DEPLOYMENT_NOT_FOUND",
            details={"pool": pool, "deployment": deployment},
        )
    body = decode(await read_body(request, MAX_ADMIN_BODY_BYTES), ScaleBody)
    cap = next(d.max_replicas for d in cfg.deployments if d.name == deployment)
    if body.replicas > cap:
        raise BadRequest(
            f"replicas {body.replicas} is more than deployment {deployment!r} allows (max_replicas = {cap})",
            error_code="VALIDATION_ERROR",
            details={"field": "replicas", "max": cap},
        )
    await fleet.set_desired(pool, deployment, body.replicas)
    return JSON({"pool": pool, "deployment": deployment, "replicas": body.replicas})


async def list_pools(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """Every pool the caller sees: status, and desired vs ready replicas per deployment."""
    pools = await visible_pools(fleet, principal)
    return JSON({"pools": [PoolSummary.of(await fleet.status(p)) for p in pools]})


async def get_pool(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """One pool with each of its live replicas, and per deployment what it answered of late
    (``recent``: requests, measured share, p50/p99, error rate, tokens over ``window_s``)."""
    pool = await _known(fleet, request.path_params["pool"], principal)
    return JSON(await fleet.status(pool, traffic=True))


async def restart(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """Rolling restart: supervisors replace the pool's replicas one at a time."""
    pool = await _known(fleet, request.path_params["pool"], principal)
    return JSON({"pool": pool, "restart_generation": await fleet.restart(pool)}, status_code=202)


async def drain(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """Replace one live replica without losing capacity: its supervisor starts a new replica, and
    once that one is ready this one stops taking work, finishes what it has, and exits."""
    pool = await _known(fleet, request.path_params["pool"], principal)
    agent_id = request.path_params["agent_id"]
    found = next((r for r in await fleet.registry.replicas(pool) if r.id == agent_id), None)
    if found is None:
        raise NotFound(
            f"pool {pool!r} has no live agent {agent_id!r}",
            error_code="AGENT_NOT_FOUND",
            details={"pool": pool, "agent_id": agent_id},
        )
    if found.status == "draining":
        raise StateConflict(
            f"agent {agent_id!r} is draining already",
            error_code="AGENT_DRAINING",
            details={"pool": pool, "agent_id": agent_id},
        )
    await fleet.drain(pool, found)
    return JSON({"pool": pool, "agent_id": agent_id, "pid": found.pid, "draining": True}, status_code=202)


async def health(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """Totals over the caller's pools: pools, healthy ones, active and total requests, avg response."""
    return JSON(Health.of([await fleet.status(p) for p in await visible_pools(fleet, principal)]))


ROUTES = [
    Route("/v1/pools", admin(list_pools), methods=["GET"]),
    Route("/v1/pools/{pool}", admin(get_pool), methods=["GET"]),
    Route("/v1/pools/{pool}/deployments/{deployment}", admin(scale), methods=["PUT"]),
    Route("/v1/pools/{pool}/restart", admin(restart), methods=["POST"]),
    Route("/v1/pools/{pool}/agents/{agent_id}/drain", admin(drain), methods=["POST"]),
    Route("/v1/health", admin(health), methods=["GET"]),
]


async def config_status(request: Request, fleet: Fleet, principal: Principal) -> Response:
    """The pools config this gateway runs: source (api, redis, file), version, ETag, when it was
    loaded, and the last refusal (broker/config_source.py). Its reasons can name any tenant's pool,
    so a key without the ``fleet`` scope sees only that there was one."""
    status = request.app.state.config_source.status()
    if status.last_error and not fleet_wide(principal):
        status = msgspec.structs.replace(status, last_error="refused (a key with the fleet scope sees why)")
    return JSON(status)


ROUTES.append(Route("/v1/config", admin(config_status), methods=["GET"]))  # GET /v1/config
