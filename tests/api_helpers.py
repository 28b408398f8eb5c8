"""Helpers for the external-API tests: a two-tenant pools file, keys, a webhook receiver, and a
gateway served to an SDK (the OpenAI- and Anthropic-compatible endpoints' tests)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentpool.gateway.keys import KeyStore
from agentpool.shared.config import Config, parse_config
from tests.conftest import System, free_port, running_gateway, wait_until

POOL = """
[pools.{name}]
tenant = "{tenant}"
limits = {{ concurrency = 4, sticky_depth = 3, max_depth = 10, max_wait_s = {max_wait_s} }}
{pool_extra}
[[pools.{name}.deployments]]
name = "main"
agent_type = "echo"
replicas = {replicas}
"""


def tenant_config(
    *,
    extra: str = "",
    pools: dict[str, str] | None = None,
    replicas: int = 1,
    pool_extra: str = "",
    tokens_per_s: float = 0,
    max_wait_s: float = 60,
) -> Config:
    """Pools ``pa`` (tenant ``ta``) and ``pb`` (tenant ``tb``), one fake replica each, unless told."""
    text = f"""
[providers.fake]
kind = "fake"
tokens_per_s = {tokens_per_s}
reply_tokens = 12

[agent_types.echo]
system_prompt = "You are a test agent."
provider = "fake"
"""
    for name, tenant in (pools or {"pa": "ta", "pb": "tb"}).items():
        text += POOL.format(
            name=name, tenant=tenant, replicas=replicas, pool_extra=pool_extra, max_wait_s=max_wait_s
        )
    return parse_config(text + extra, "test.toml")


def store(system: System) -> KeyStore:
    return KeyStore(system.client.redis, system.client.names)


async def make_key(system: System, tenant: str, *scopes: str, rpm: int | None = None) -> tuple[str, str]:
    """-> (key id, key)."""
    info, key = await store(system).create(tenant, list(scopes) or ["ask"], rpm=rpm)
    return info.id, key


def h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it came in


@dataclass
class Receiver:
    """A local webhook endpoint: answers with ``statuses`` in turn (the last one repeats)."""

    url: str = ""
    statuses: list[int] = field(default_factory=lambda: [200])
    deliveries: list[Delivery] = field(default_factory=list)
    delay_s: float = 0.0

    async def handle(self, request: Request) -> Response:
        self.deliveries.append(Delivery(dict(request.headers), await request.body()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses[min(len(self.deliveries), len(self.statuses)) - 1]
        return Response(b"ok" if status < 300 else b"no", status_code=status)

    async def wait_for(self, n: int, timeout_s: float = 15.0) -> None:
        await wait_until(lambda: len(self.deliveries) >= n, timeout_s, f"{n} webhook deliveries")


@contextlib.asynccontextmanager
async def receiver(statuses: list[int] | None = None) -> AsyncIterator[Receiver]:
    """A :class:`Receiver` served by uvicorn on a free loopback port, in this event loop."""
    import uvicorn

    from agentpool.gateway.server import EmbeddedServer

    rec = Receiver(statuses=statuses or [200])
    port = free_port()
    app = Starlette(routes=[Route("/hook", rec.handle, methods=["POST"])])
    srv = EmbeddedServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    task = asyncio.create_task(srv.serve())
    await wait_until(lambda: srv.started or task.done(), 10, "webhook receiver start")
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


S = TypeVar("S")


@dataclass
class Served(Generic[S]):
    """A gateway on a system, an SDK client on it and a plain httpx client with the same key."""

    url: str
    key: str
    sdk: S
    http: httpx.AsyncClient
    make: Callable[..., S]  # another SDK client on this gateway, given the SDK's options

    def sdk_with(self, **kw: Any) -> S:
        return self.make(**{"api_key": self.key, "max_retries": 0, "timeout": 20, **kw})

    async def record(self, request_id: str) -> dict[str, Any]:
        """GET /v1/requests/{id}: agentpool's own view of a request."""
        r = await self.http.get(f"/v1/requests/{request_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())


@contextlib.asynccontextmanager
async def serving(
    system: System, tenant: str, sdk_for: Callable[..., S], rpm: int | None = None
) -> AsyncIterator[Served[S]]:
    """The real gateway, a key of ``tenant`` and ``sdk_for(url, **options)``'s client on it."""
    _, key = await make_key(system, tenant, "ask", rpm=rpm)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, headers=h(key), timeout=20) as http,
    ):
        served = Served(url, key, None, http, functools.partial(sdk_for, url))
        served.sdk = served.sdk_with()
        try:
            yield served
        finally:
            await served.sdk.close()  # type: ignore[attr-defined]
