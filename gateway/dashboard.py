"""The fleet dashboard: ``GET /ui`` (static page, script and style, all served from here) and the
two API routes it reads.

    GET /v1/fleet          the caller's view now: pools -> deployments -> agents, totals, 15 min of history
    GET /v1/fleet/events   the same as SSE: one ``fleet`` event a second (history: only the newest buckets)

Any valid key reads them: an ``ask``-only key sees its tenant's pools read-only, an ``admin`` key
gets the controls (they call the admin API), and a ``fleet`` key sees every tenant's pools. The
page sends its key in a header from ``fetch`` (never in a URL: that is why it reads the stream with
``fetch`` rather than ``EventSource``, which cannot send headers). Under ``AGENTPOOL_AUTH=open`` a
request without a key is tenant ``default`` with every scope, so the page works without signing in.

One view per (tenant, fleet-wide) is built at most every ``VIEW_TTL_S`` per process, however many
dashboards are open; history comes from Redis (broker/history.py), so every gateway shows the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from agentpool.broker import history
from agentpool.broker.client import AgentPoolClient
from agentpool.broker.fleet import DeploymentStatus, Fleet, ReplicaView
from agentpool.broker.history import BUCKET_S, WINDOW_S, Point
from agentpool.broker.redis_conn import REDIS_ERRORS, translated
from agentpool.gateway.admin import fleet_wide, visible_pools
from agentpool.gateway.auth import Principal, require
from agentpool.gateway.http import JSON
from agentpool.gateway.sse import SSE_HEADERS
from agentpool.shared.errors import NotFound

UPDATE_S = 1.0  # a dashboard gets a fresh view this often
VIEW_TTL_S = 0.5  # views younger than this are shared between the dashboards of one process
RECENT_BUCKETS = 2  # history in each update: the bucket in progress and the one before

UI_DIR = Path(__file__).parent / "ui"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
# Everything comes from the gateway itself: no CDN, no inline script, nothing framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class Viewer(msgspec.Struct, kw_only=True):
    tenant: str
    scopes: list[str]
    key_id: str | None
    fleet_wide: bool  # sees every tenant's pools
    can_act: bool  # holds admin: scale, restart, drain
    auth: str  # the gateway's mode: required | open


class PoolView(msgspec.Struct, kw_only=True):
    pool: str
    tenant: str
    status: str
    asleep: bool
    requests: int
    restart_generation: int
    concurrency: int  # requests one agent runs at once
    max_depth: int  # no agent is sent more than this
    deployments: list[DeploymentStatus]
    agents: list[ReplicaView]


class Totals(msgspec.Struct, kw_only=True):
    pools: int
    healthy_pools: int
    agents_ready: int
    agents_desired: int
    in_flight: int
    queued: int  # waiting in agents' queues
    processed: int  # by the live agents
    errors: int
    rate: float  # requests/s ended, over the newest full history bucket


class FleetView(msgspec.Struct, kw_only=True):
    at: float
    viewer: Viewer
    totals: Totals
    pools: list[PoolView]
    # pool -> points, each [t, rate, p50_ms, p99_ms, error_rate, r503, r429, tokens]
    history: dict[str, list[Point]]
    bucket_s: int = BUCKET_S
    window_s: int = WINDOW_S


def _viewer(request: Request, p: Principal) -> Viewer:
    return Viewer(
        tenant=p.tenant,
        scopes=sorted(p.scopes),
        key_id=p.key_id,
        fleet_wide=fleet_wide(p),
        can_act="admin" in p.scopes,
        auth=request.app.state.settings.auth,
    )


async def _pool_views(fleet: Fleet, principal: Principal) -> list[PoolView]:
    out = []
    for name in await visible_pools(fleet, principal):
        cfg = fleet.pool_config(name)
        if cfg is None:
            continue
        s = await fleet.status(name)
        out.append(
            PoolView(
                pool=name,
                tenant=cfg.tenant,
                status=s.status,
                asleep=s.asleep,
                requests=s.requests,
                restart_generation=s.restart_generation,
                concurrency=cfg.limits.concurrency,
                max_depth=cfg.limits.max_depth,
                deployments=s.deployments,
                agents=sorted(s.replicas, key=lambda r: r.id),
            )
        )
    return out


def _totals(pools: list[PoolView], hist: dict[str, list[Point]]) -> Totals:
    agents = [a for p in pools for a in p.agents]
    rate = 0.0
    for points in hist.values():
        full = [pt for pt in points if pt.t + BUCKET_S <= time.time()]
        if full:
            rate += full[-1].rate
    return Totals(
        pools=len(pools),
        healthy_pools=sum(p.status in ("healthy", "idle") for p in pools),
        agents_ready=sum(d.ready for p in pools for d in p.deployments),
        agents_desired=sum(d.desired for p in pools for d in p.deployments),
        in_flight=sum(a.in_flight for a in agents),
        queued=sum(a.depth - a.in_flight for a in agents),
        processed=sum(a.processed for a in agents),
        errors=sum(a.errors for a in agents),
        rate=round(rate, 3),
    )


class Views:
    """Views built at most every ``VIEW_TTL_S`` per (tenant, fleet-wide), shared by the dashboards
    of this process; one build at a time per key."""

    def __init__(self, client: AgentPoolClient) -> None:
        self.client = client
        self._cache: dict[tuple[str, bool], tuple[float, list[PoolView], dict[str, list[Point]]]] = {}
        self._locks: dict[tuple[str, bool], asyncio.Lock] = {}

    async def recent(self, principal: Principal) -> tuple[list[PoolView], dict[str, list[Point]]]:
        key = (principal.tenant, fleet_wide(principal))
        async with self._locks.setdefault(key, asyncio.Lock()):
            found = self._cache.get(key)
            if found is not None and time.monotonic() - found[0] < VIEW_TTL_S:
                return found[1], found[2]
            client = self.client
            pools = await _pool_views(client.fleet, principal)
            since = time.time() - RECENT_BUCKETS * BUCKET_S
            hist = await history.read(client.redis, client.names, [p.pool for p in pools], since)
            self._cache[key] = (time.monotonic(), pools, hist)
            return pools, hist


async def _view(request: Request, principal: Principal, full_history: bool) -> FleetView:
    client: AgentPoolClient = request.app.state.client
    pools, hist = await request.app.state.views.recent(principal)
    if full_history:
        hist = await history.read(client.redis, client.names, [p.pool for p in pools], 0)
    return FleetView(
        at=time.time(),
        viewer=_viewer(request, principal),
        totals=_totals(pools, hist),
        pools=pools,
        history=hist,
    )


async def fleet(request: Request) -> Response:
    """The caller's fleet now, with the last 15 minutes of history per pool."""
    principal = await require(request, "ask", "admin")  # any key that reads pools
    with translated(request.app.state.client.settings.redis_url):
        return JSON(await _view(request, principal, full_history=True), headers={"Cache-Control": "no-store"})


_ENC = msgspec.json.Encoder()


async def events(request: Request) -> Response:
    """``fleet`` events, one per ``UPDATE_S``: the first with the whole window's history, then only
    the newest buckets (the page merges them by time). While Redis is away, ``unavailable``
    events say so and the stream goes on; it ends when the gateway stops."""
    principal = await require(request, "ask", "admin")  # any key that reads pools
    with translated(request.app.state.client.settings.redis_url):
        first = await _view(request, principal, full_history=True)
    return StreamingResponse(
        _updates(request, principal, first),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, "Cache-Control": "no-store"},
    )


async def _updates(request: Request, principal: Principal, first: FleetView) -> AsyncIterator[bytes]:
    closing: asyncio.Event = request.app.state.closing
    yield b"event: fleet\ndata: " + _ENC.encode(first) + b"\n\n"
    while not closing.is_set():
        try:
            async with asyncio.timeout(UPDATE_S):
                await closing.wait()
            return
        except TimeoutError:
            pass
        try:
            view = await _view(request, principal, full_history=False)
        except REDIS_ERRORS as e:
            msg = _ENC.encode({"error": f"Redis is unavailable: {type(e).__name__}", "at": time.time()})
            yield b"event: unavailable\ndata: " + msg + b"\n\n"
            continue
        yield b"event: fleet\ndata: " + _ENC.encode(view) + b"\n\n"


def _load_assets() -> dict[str, tuple[bytes, str, str]]:
    out = {}
    for path in sorted(UI_DIR.iterdir()):
        if path.suffix in _TYPES and path.is_file():
            body = path.read_bytes()
            out[path.name] = (body, _TYPES[path.suffix], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return out


_ASSETS = _load_assets()


def _asset(name: str, request: Request) -> Response:
    found = _ASSETS.get(name)
    if found is None:
        raise NotFound(f"no dashboard file {name!r}", error_code="NOT_FOUND")
    body, kind, etag = found
    headers = {**_PAGE_HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=kind, headers=headers)


async def page(request: Request) -> Response:
    return _asset("index.html", request)


async def asset(request: Request) -> Response:
    return _asset(request.path_params["name"], request)


ROUTES = [
    Route("/ui", page, methods=["GET"]),
    Route("/ui/", page, methods=["GET"]),
    Route("/ui/{name}", asset, methods=["GET"]),
    Route("/v1/fleet", fleet, methods=["GET"]),
    Route("/v1/fleet/events", events, methods=["GET"]),
]
