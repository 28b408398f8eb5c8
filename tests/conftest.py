"""Fixtures: real RabbitMQ and Redis, one namespace per test, cleaned up afterwards.

Services come from AGENTPOOL_AMQP_URL/AMQP_URL and AGENTPOOL_REDIS_URL/REDIS_URL (default: the
local servers), or from testcontainers when no local server answers and a Docker engine does.
Without either, tests skip locally and fail under CI (CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika
import httpx
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aredis

from agentpool.broker.client import AgentPoolClient
from agentpool.shared.config import Config, parse_config
from agentpool.shared.names import Names, replica_id
from agentpool.shared.settings import Settings

if TYPE_CHECKING:
    from tests.servers import RabbitNode, RedisServer

RUN = secrets.token_hex(3)
_counter = iter(range(1, 10_000))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


def shared_service_urls() -> tuple[str, str] | None:
    """The RabbitMQ and Redis this machine (or CI) shares with the suite, if they answer."""
    amqp = (
        os.environ.get("AGENTPOOL_AMQP_URL")
        or os.environ.get("AMQP_URL")
        or "amqp://guest:guest@127.0.0.1:5672/"
    )
    red = os.environ.get("AGENTPOOL_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if (_reachable("127.0.0.1", 5672) and _reachable("127.0.0.1", 6379)) or "AMQP_URL" in os.environ:
        return amqp, red
    return None


@pytest.fixture(scope="session")
def service_urls() -> Iterator[tuple[str, str]]:
    shared = shared_service_urls()
    if shared is not None:
        yield shared
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer
        from testcontainers.redis import RedisContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as rmq, RedisContainer("redis:7") as rds:
            yield (
                f"amqp://guest:guest@{rmq.get_container_host_ip()}:{rmq.get_exposed_port(5672)}/",
                f"redis://{rds.get_container_host_ip()}:{rds.get_exposed_port(6379)}/0",
            )
        return
    msg = "RabbitMQ/Redis not reachable on 127.0.0.1 and no Docker engine for testcontainers"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


# --- The suite leaves what it does not own as it found it: the shared Redis and RabbitMQ.

SENTINEL = f"agentpool-suite-sentinel:{RUN}"  # outside every test namespace (t{RUN}-N)
# Keys of each kind a system keeps, in a namespace no test uses: a hash, a list, a set (each with
# a TTL, so a run cut short leaves nothing behind for long). Keys of other, live systems on the
# same Redis (an `agentpool dev` running beside the suite) change by themselves: not compared.
SENTINEL_KEYS = {
    f"{SENTINEL}:hash": ("hset", {"a": "1", "b": "2"}),
    f"{SENTINEL}:list": ("rpush", ["x", "y", "z"]),
    f"{SENTINEL}:set": ("sadd", ["p", "q"]),
}
SENTINEL_QUEUES = {  # name: durable
    f"agentpool-suite-sentinel-{RUN}": True,
    f"agentpool-suite-sentinel-{RUN}-transient": False,
}
SENTINEL_TTL_S = 2 * 3600  # outlives a whole run; one cut short leaves nothing behind for long
_T = TypeVar("_T")


def _off_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on a loop of its own in a thread, leaving the session's loop to the tests."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(60)


async def _plant_queues(url: str) -> None:
    """A durable queue holding one persistent message, and a transient one (which a restart of
    the broker drops: ``stop_app`` deletes transient queues)."""
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel()
        for name, durable in SENTINEL_QUEUES.items():
            await ch.declare_queue(name, durable=durable, arguments={"x-expires": SENTINEL_TTL_S * 1000})
        message = aio_pika.Message(RUN.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await ch.default_exchange.publish(message, routing_key=next(iter(SENTINEL_QUEUES)))


async def _check_queues(url: str) -> list[str]:
    """What changed about the sentinel queues (then deletes them)."""
    problems = []
    try:
        conn = await aio_pika.connect(url)
    except (aio_pika.exceptions.AMQPError, OSError) as e:
        return [f"the shared RabbitMQ does not answer after the run: {e!r}"]
    async with conn:
        for name, durable in SENTINEL_QUEUES.items():
            ch = await conn.channel()
            try:
                q = await ch.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                why = "" if durable else " (the broker application restarted: it drops transient queues)"
                problems.append(f"RabbitMQ queue {name} is gone{why}")
                continue
            count = q.declaration_result.message_count
            if count != int(durable):
                problems.append(f"RabbitMQ queue {name} holds {count} messages, not {int(durable)}")
        ch = await conn.channel()
        for name in SENTINEL_QUEUES:
            await ch.queue_delete(name)
    return problems


def _plant_keys(r: redis.Redis) -> dict[str, bytes]:
    """The sentinel keys -> their DUMPs."""
    r.set(SENTINEL, RUN, ex=SENTINEL_TTL_S)
    for key, (command, value) in SENTINEL_KEYS.items():
        if command == "hset":
            r.hset(key, mapping=value)  # type: ignore[arg-type]
        else:
            getattr(r, command)(key, *value)
        r.expire(key, SENTINEL_TTL_S)
    return {key: r.dump(key) for key in SENTINEL_KEYS}  # type: ignore[misc]


def _redis_problems(r: redis.Redis, run_id: str, planted: dict[str, bytes]) -> list[str]:
    try:
        problems = []
        if (now := r.info("server")["run_id"]) != run_id:
            problems.append(f"Redis restarted during the run (run_id {run_id} -> {now})")
        if r.get(SENTINEL) != RUN.encode() or r.ttl(SENTINEL) <= 0:
            problems.append(f"Redis key {SENTINEL} lost its value {RUN!r} or its TTL")
        changed = [k for k, v in planted.items() if r.dump(k) != v or r.ttl(k) <= 0]
        if changed:
            problems.append(f"Redis keys outside the suite's namespaces changed or vanished: {changed}")
        return problems
    except redis.RedisError as e:
        return [f"the shared Redis does not answer after the run: {e}"]


@pytest.fixture(scope="session", autouse=True)
def shared_services_untouched() -> Iterator[None]:
    """Running the suite leaves the machine's Redis keys and RabbitMQ state outside its
    namespaces as it found them: planted before the first test, checked after the last.

    Redis: a string, a hash, a list and a set, each with a TTL, and the server's run_id (a restart
    changes it). RabbitMQ: a durable queue with one message, and a transient queue that a
    restart of the broker would have dropped. A difference fails the run (an error in session
    teardown); the sentinels are deleted either way.
    """
    shared = shared_service_urls()
    if shared is None:  # testcontainers or nothing: no shared service to protect
        yield
        return
    amqp_url, redis_url = shared
    with redis.Redis.from_url(redis_url, socket_timeout=10) as r:
        run_id, planted = r.info("server")["run_id"], _plant_keys(r)
        _off_loop(_plant_queues(amqp_url))
        try:
            yield
        finally:
            problems = _redis_problems(r, run_id, planted) + _off_loop(_check_queues(amqp_url))
            with contextlib.suppress(redis.RedisError):
                r.delete(SENTINEL, *SENTINEL_KEYS)
    if problems:
        pytest.fail("the suite touched services it does not own:\n- " + "\n- ".join(problems))


# --- Servers of the suite's own for the tests that stop, restart or kill them (tests/servers.py)


@pytest.fixture(scope="session")
def own_rabbit_node() -> Iterator[RabbitNode]:
    """One throwaway RabbitMQ node for the session: a node takes seconds to start (~7 s here)."""
    from tests.servers import rabbit_node

    with rabbit_node() as node:
        yield node


@pytest.fixture
def own_rabbit(own_rabbit_node: RabbitNode) -> RabbitNode:
    """The session's throwaway node with its broker app running (a failed test may have stopped it)."""
    own_rabbit_node.ensure_app()
    return own_rabbit_node


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A throwaway redis-server with the shipped deploy/redis/redis.conf, for one test."""
    from tests.servers import redis_server

    with redis_server() as server:
        yield server


@pytest.fixture
def own_settings(own_rabbit: RabbitNode, own_redis: RedisServer) -> Settings:
    """``settings`` on the throwaway servers; a test module that restarts them overrides
    ``settings`` with this, so ``make_system`` runs there."""
    return Settings(
        amqp_url=own_rabbit.url, redis_url=own_redis.url, namespace=f"t{RUN}-{next(_counter)}", auth="open"
    )


EXAMPLE = """
[providers.fake]
kind = "fake"
ttft_ms = {ttft_ms}
tokens_per_s = {tokens_per_s}
reply_tokens = {reply_tokens}

[agent_types.echo]
system_prompt = "You are a test agent for {{PRODUCT}}."
variables = {{ PRODUCT = "tests" }}
provider = "fake"
retries = 1

[pools.{pool}]
limits = {{ concurrency = {concurrency}, sticky_depth = {sticky_depth}, max_depth = {max_depth}, \
rescue_after_s = {rescue_after_s}, max_attempts = {max_attempts} }}

[[pools.{pool}.deployments]]
name = "main"
agent_type = "echo"
replicas = {replicas}
"""


def make_config(
    *,
    pool: str = "p",
    replicas: int = 3,
    concurrency: int = 4,
    sticky_depth: int = 3,
    max_depth: int = 10,
    ttft_ms: float = 0,
    tokens_per_s: float = 0,
    reply_tokens: int = 12,
    rescue_after_s: float = 5,
    max_attempts: int = 3,
    extra: str = "",
) -> Config:
    text = EXAMPLE.format(**locals()) + extra
    return parse_config(text, "test.toml")


async def cleanup_namespace(settings: Settings, config: Config, max_replicas: int = 12) -> None:
    """Delete every queue, exchange and key this namespace may have made."""
    names = Names(settings.namespace)
    conn = await aio_pika.connect(settings.amqp_url)
    async with conn:
        ch = await conn.channel()
        for pool, p in config.pools.items():
            queues = [names.pool_queue(pool), names.parking_queue(pool)]
            queues += [
                names.replica_queue(replica_id(pool, d.name, n))
                for d in p.deployments
                for n in range(1, max_replicas + 1)
            ]
            for q in queues:
                await ch.queue_delete(q)
            await ch.exchange_delete(names.pool_exchange(pool))
    r = aredis.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in r.scan_iter(match=names.pattern(), count=1000)]
        for i in range(0, len(keys), 500):
            await r.delete(*keys[i : i + 500])
    finally:
        await r.aclose()


@pytest.fixture
def settings(service_urls: tuple[str, str]) -> Settings:
    amqp, red = service_urls
    # open: most tests call the gateway without a key; tests of auth set "required" themselves
    return Settings(amqp_url=amqp, redis_url=red, namespace=f"t{RUN}-{next(_counter)}", auth="open")


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = predicate()
        if asyncio.iscoroutine(res) or isinstance(res, Awaitable):
            res = await res  # type: ignore[misc]
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class System:
    """A running namespace: in-process workers plus a client, all torn down by the fixture."""

    settings: Settings
    config: Config
    client: AgentPoolClient
    workers: dict[str, Any] = field(default_factory=dict)
    drain_timeout_s: float = 10.0
    _tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)

    async def start_worker(self, pool: str, deployment: str, n: int, wait: bool = True) -> Any:
        from agentpool.workers.runtime import Worker

        w = Worker(self.settings, self.config, pool, deployment, n)
        stop = asyncio.Event()
        task = asyncio.create_task(w.async_run(stop, drain_timeout_s=self.drain_timeout_s))
        self.workers[w.replica_id] = w
        self._tasks[w.replica_id] = (task, stop)
        if wait:
            ready = asyncio.create_task(w.ready.wait())
            await asyncio.wait([ready, task], timeout=15, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                ready.cancel()
                task.result()  # re-raise the start-up failure
            assert w.ready.is_set(), f"{w.replica_id} not ready"
        return w

    async def stop_worker(self, rid: str) -> None:
        task, stop = self._tasks.pop(rid)
        stop.set()
        await asyncio.wait_for(task, 20)
        self.workers.pop(rid, None)

    async def start_all(self) -> None:
        for pool, p in self.config.pools.items():
            for d in p.deployments:
                for n in range(1, d.replicas + 1):
                    await self.start_worker(pool, d.name, n)
        await self.wait_members()

    async def wait_members(self, pool: str | None = None) -> None:
        for name in [pool] if pool else list(self.config.pools):
            want = {rid for rid, w in self.workers.items() if w.pool_name == name}

            async def ok(name: str = name, want: set[str] = want) -> bool:
                await self.client.refresh_membership()
                return {r.id for r in self.client.router.members(name)} == want

            await wait_until(ok, 10, f"membership of {name} = {sorted(want)}")

    async def close(self) -> None:
        for w in self.workers.values():  # the test is over: nothing routes to them any more,
            w.router_grace_s = w.queue_empty_wait_s = 0.0  # and the namespace is deleted after
        await asyncio.gather(*(self.stop_worker(rid) for rid in list(self._tasks)), return_exceptions=True)


@pytest.fixture
async def make_system(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[System]]]:
    systems: list[System] = []

    async def factory(
        config: Config | None = None, start: bool = True, drain_timeout_s: float = 10.0, **kw: Any
    ) -> System:
        cfg = config or make_config(**kw)
        client = AgentPoolClient(settings, cfg)
        await client.start()
        system = System(settings, cfg, client, drain_timeout_s=drain_timeout_s)
        systems.append(system)
        if start:
            await system.start_all()
        return system

    yield factory
    for s in systems:
        await s.close()
        await s.client.aclose()
        await cleanup_namespace(s.settings, s.config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, config: Config) -> AsyncIterator[str]:
    """The real gateway on a free loopback port (uvicorn in this event loop)."""
    from agentpool.gateway.server import server

    port = free_port()
    srv = server(settings, config, "127.0.0.1", port, embedded=True)
    task = asyncio.create_task(srv.serve())
    await wait_until(lambda: srv.started or task.done(), 15, "gateway start")
    if task.done():
        task.result()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 15)


def subprocess_env(settings: Settings, config_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AGENTPOOL_AMQP_URL": settings.amqp_url,
        "AGENTPOOL_REDIS_URL": settings.redis_url,
        "AGENTPOOL_NAMESPACE": settings.namespace,
        "AGENTPOOL_AUTH": settings.auth,
        "AGENTPOOL_CONFIG": str(config_path),
        "PYTHONUNBUFFERED": "1",
    }


FAKE_KEY_ENV = "AGENTPOOL_TEST_FAKE_LLM_KEY"  # the variable make_provider's SDK providers read their key from


@pytest_asyncio.fixture(loop_scope="session")
async def control(fake_llm: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the module's fake LLM server (its ``fake_llm`` fixture), reset for this test."""
    async with httpx.AsyncClient(base_url=fake_llm.url, timeout=5) as client:
        (await client.post("/_fake/reset")).raise_for_status()
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def make_provider(
    fake_llm: Any, control: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """Builds providers of a kind: the SDK ones aimed at the module's fake server (its key in
    FAKE_KEY_ENV), ``fake`` in process; closes them after the test."""
    from agentpool.shared.config import AgentType
    from agentpool.shared.config import Provider as ProviderConfig
    from agentpool.workers.providers import build_provider

    settings = fake_llm.fake.settings
    monkeypatch.setenv(FAKE_KEY_ENV, settings.api_key)
    made: list[Any] = []

    def make(kind: str, *, base_url: str | None = None, key_env: str = FAKE_KEY_ENV, **agent: Any) -> Any:
        if kind == "fake":
            config = ProviderConfig(kind="fake", reply_tokens=settings.reply_tokens)
        else:
            url = base_url or (f"{fake_llm.url}/v1" if kind == "openai" else fake_llm.url)
            config = ProviderConfig(kind=kind, base_url=url, api_key_env=key_env)  # type: ignore[arg-type]
        provider = build_provider(config, AgentType(provider="fake-llm", model="fake-1", **agent))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


PYTHON = sys.executable
__all__ = ["PYTHON", "System", "make_config", "replace", "running_gateway", "subprocess_env", "wait_until"]
