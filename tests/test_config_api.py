"""The pools config from a backend API (AGENTPOOL_CONFIG_URL): live changes with no restart, an API
that goes away, refused documents, and ``agentpool reload`` / SIGHUP for the pools file.

A small HTTP server on loopback plays the API: it serves a JSON document with an ETag (304 for
If-None-Match), wants the configured Authorization header, can answer 500 or an invalid document,
and stops and starts again on the same port. The gateway and the supervisor are the real ones,
started from a :class:`ConfigSource` as ``agentpool gateway`` / ``agentpool workers`` start them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aredis

from agentpool.broker.config_source import ConfigSource, config_version
from agentpool.gateway.server import server
from agentpool.shared.config import Config, config_from_data
from agentpool.shared.errors import ConfigError
from agentpool.shared.settings import Settings
from agentpool.workers.supervisor import Supervisor
from tests.api_helpers import make_key
from tests.conftest import PYTHON, cleanup_namespace, free_port, subprocess_env, wait_until
from tests.fleet_support import pid_alive

pytestmark = pytest.mark.timeout(120)

POLL_S = 0.5
TOKEN = "Bearer config-api-test"
PROMPT = "You are a test agent."


def document(pools: dict[str, int], prompt: str = PROMPT) -> dict[str, Any]:
    """A pools config in the pools file's schema: pools name -> replicas of deployment ``main``."""
    return {
        "providers": {"fake": {"kind": "fake", "reply_tokens": 6}},
        "agent_types": {"echo": {"provider": "fake", "system_prompt": prompt}},
        "pools": {
            name: {
                "limits": {"max_wait_s": 30, "rescue_after_s": 2},
                "deployments": [{"name": "main", "agent_type": "echo", "replicas": n}],
            }
            for name, n in pools.items()
        },
    }


def version_of(doc: dict[str, Any]) -> str:
    return config_version(config_from_data(json.loads(json.dumps(doc))))


class ConfigApi:
    """The backend API: ``doc`` as JSON with an ETag; ``status`` other than 200 answers just that."""

    def __init__(self) -> None:
        self.port = free_port()
        self.body = b"{}"
        self.status = 200
        self.requests: list[dict[str, str]] = []  # the headers of each request
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # connections being answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/pools?token=not-shown"

    def serve(self, doc: dict[str, Any] | bytes, status: int = 200) -> None:
        self.body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.status = status

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Down, as a crashed server: listening stops and the connections it was answering are cut
        (closing a server leaves them open; one left to the garbage collector is a ResourceWarning)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:] if ln)
            }
            self.requests.append(headers)
            etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'
            status, body, extra = self.status, b"", ""
            if headers.get("authorization") != TOKEN:
                status = 401
            elif status == 200 and headers.get("if-none-match") == etag:
                status = 304
            elif status == 200:
                body, extra = self.body, f"ETag: {etag}\r\nContent-Type: application/json\r\n"
            head_out = f"HTTP/1.1 {status} X\r\n{extra}Content-Length: {len(body)}\r\nConnection: close\r\n"
            writer.write(head_out.encode() + b"\r\n" + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, or stop() cut the connection
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def api() -> AsyncIterator[ConfigApi]:
    served = ConfigApi()
    await served.start()
    yield served
    await served.stop()


@pytest.fixture
async def made(settings: Settings) -> AsyncIterator[set[str]]:
    """Names of the pools a test made queues and keys for; the namespace is cleaned up after it."""
    pools: set[str] = set()
    yield pools
    await cleanup_namespace(settings, config_from_data(document(dict.fromkeys(pools | {"p"}, 1))))


def on_api(settings: Settings, api: ConfigApi, **kw: Any) -> Settings:
    return replace(
        settings, config_url=api.url, config_headers={"Authorization": TOKEN}, config_poll_s=POLL_S, **kw
    )


@contextlib.asynccontextmanager
async def gateway(settings: Settings, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway started as ``agentpool gateway`` starts it (its config from a ConfigSource), and
    a client of it (sending ``key``)."""
    source = ConfigSource(settings)
    await source.initial()
    port = free_port()
    srv = server(settings, None, "127.0.0.1", port, embedded=True, source=source)
    task = asyncio.create_task(srv.serve())
    await wait_until(lambda: srv.started or task.done(), 15, "gateway start")
    if task.done():
        task.result()
    try:
        headers = {"X-API-Key": key} if key else {}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers
        ) as http:
            yield http
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def supervisor(settings: Settings) -> AsyncIterator[Supervisor]:
    """A supervisor started as ``agentpool workers`` starts it; its workers are real processes."""
    source = ConfigSource(settings)
    await source.initial()
    sup = Supervisor(settings, source.config, source=source)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.async_run(stop))
    try:
        yield sup
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def config_of(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/v1/config")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def ready_pids(http: httpx.AsyncClient, pool: str) -> set[int]:
    r = await http.get(f"/v1/pools/{pool}")
    if r.status_code == 404:
        return set()
    assert r.status_code == 200, r.text
    return {a["pid"] for a in r.json()["replicas"] if a["status"] == "ready"}


async def ask(http: httpx.AsyncClient, pool: str) -> httpx.Response:
    return await http.post(f"/v1/ask/{pool}", json={"content": "hello", "max_wait_s": 30})


def count_is(http: httpx.AsyncClient, pool: str, n: int) -> Callable[[], Any]:
    async def ok() -> bool:
        return len(await ready_pids(http, pool)) == n

    return ok


async def test_changes_served_by_the_api_apply_live(
    settings: Settings, api: ConfigApi, made: set[str]
) -> None:
    # Given an API serving pool p (one replica), and a gateway and a supervisor started from it
    made.update({"p", "q"})
    api.serve(document({"p": 1}))
    s = on_api(settings, api)
    async with gateway(s) as http, supervisor(s):
        await wait_until(count_is(http, "p", 1), 30, "p ready")
        assert (await ask(http, "p")).status_code == 200
        first = await config_of(http)
        assert (first["source"], first["version"]) == ("api", version_of(document({"p": 1})))
        assert first["url"] == f"http://127.0.0.1:{api.port}/pools" and first["etag"]
        assert {r.get("authorization") for r in api.requests} == {TOKEN}
        p_pids = await ready_pids(http, "p")

        # When the API adds pool q
        api.serve(document({"p": 1, "q": 1}))
        changed = time.monotonic()

        # Then the gateway serves it within two poll periods, q answers, and p is left alone
        async def q_known() -> bool:
            return (await http.get("/v1/pools/q")).status_code == 200

        await wait_until(q_known, 2 * POLL_S + 0.5, "the gateway to know pool q")
        assert time.monotonic() - changed <= 2 * POLL_S + 0.5
        answer = await ask(http, "q")
        assert answer.status_code == 200, answer.text
        assert answer.json()["agent_id"] == "q-main-1"
        assert await ready_pids(http, "p") == p_pids
        assert any("if-none-match" in r for r in api.requests)  # polls ask for changes only

        # When p goes from one replica to two
        api.serve(document({"p": 2, "q": 1}))
        # Then a second replica starts, and the first one keeps running
        await wait_until(count_is(http, "p", 2), 30, "p at 2 replicas")
        assert p_pids < await ready_pids(http, "p")

        # When the agent type changes, under a steady trickle of requests to p
        before = await ready_pids(http, "p") | await ready_pids(http, "q")
        api.serve(document({"p": 2, "q": 1}, prompt="You are a changed agent."))
        failures: list[str] = []
        stop = asyncio.Event()

        async def trickle() -> None:
            while not stop.is_set():
                r = await ask(http, "p")
                if r.status_code != 200:
                    failures.append(r.text)

        lane = asyncio.create_task(trickle())

        # Then every replica of p and q is replaced, one at a time, and every request is answered
        async def replaced() -> bool:
            p_now, q_now = await ready_pids(http, "p"), await ready_pids(http, "q")
            return len(p_now) == 2 and len(q_now) == 1 and not (p_now | q_now) & before

        await wait_until(replaced, 60, "p and q replaced")
        stop.set()
        await lane
        assert not failures

        # When q is removed: its replica retires (drains and exits), q is no pool, p is left alone
        p_pids, (q_pid,) = await ready_pids(http, "p"), await ready_pids(http, "q")
        api.serve(document({"p": 2}, prompt="You are a changed agent."))
        await wait_until(lambda: not pid_alive(q_pid), 30, "q's replica retired")
        assert (await ask(http, "q")).status_code == 404
        assert await ready_pids(http, "p") == p_pids


async def test_with_the_api_down_the_system_serves_on_and_fresh_processes_start_from_redis(
    settings: Settings, api: ConfigApi, made: set[str], tmp_path: Path
) -> None:
    # Given an API serving pool p, a pools file naming another pool, and a gateway and a supervisor
    made.update({"p", "q", "fromfile"})
    fallback = tmp_path / "pools.json"
    fallback.write_text(json.dumps(document({"fromfile": 1})))
    api.serve(document({"p": 1}))
    s = on_api(settings, api, config_path=str(fallback))
    v1 = version_of(document({"p": 1}))
    async with gateway(s) as http:
        async with supervisor(s):
            await wait_until(count_is(http, "p", 1), 30, "p ready")

            # When the API goes down
            await api.stop()

            # Then the gateway keeps the config, says why it could not poll, stays ready and answers
            async def noticed() -> bool:  # (a poll cut off as the port closed may fail otherwise first)
                return "ConnectError" in ((await config_of(http))["last_error"] or "")

            await wait_until(noticed, 2 * POLL_S + 1, "the failed poll in /v1/config")
            body = await config_of(http)
            assert (body["source"], body["version"]) == ("api", v1) and body["errors"] >= 1
            assert (await http.get("/readyz")).status_code == 200
            assert (await ask(http, "p")).status_code == 200
            scrape = (await http.get("/metrics")).text  # (this process's: its gateway and supervisor)
            assert f'agentpool_config_info{{source="api",version="{v1}"}} 1.0' in scrape
            assert "agentpool_config_errors_total" in scrape
            assert "agentpool_config_loaded_timestamp_seconds" in scrape

        # And a fresh gateway and supervisor start from the last good config Redis keeps
        async with gateway(s) as fresh, supervisor(s):
            body = await config_of(fresh)
            assert (body["source"], body["version"]) == ("redis", v1)
            assert "ConnectError" in body["last_error"]
            assert (await fresh.get("/v1/pools/fromfile")).status_code == 404
            assert (await fresh.get("/readyz")).status_code == 200
            answer = await ask(fresh, "p")  # a replica the fresh supervisor starts
            assert answer.status_code == 200, answer.text

            # When the API comes back on its port with pool q, both gateways take it
            api.serve(document({"p": 1, "q": 1}))
            await api.start()

            async def back(h: httpx.AsyncClient) -> bool:
                body = await config_of(h)
                return body["source"] == "api" and body["version"] != v1 and body["last_error"] is None

            await wait_until(lambda: back(fresh), 2 * POLL_S + 1, "the fresh gateway on the API again")
            await wait_until(lambda: back(http), 2 * POLL_S + 1, "the first gateway on the API again")
            assert (await ask(fresh, "q")).status_code == 200


async def test_an_invalid_document_is_refused_and_the_reason_shown(
    settings: Settings, api: ConfigApi, made: set[str], make_system: Any
) -> None:
    # Given an API serving pool p, replicas of p, and a gateway on the API that wants keys
    good = document({"p": 1})
    api.serve(good)
    system = await make_system(config_from_data(document({"p": 1})))
    _, operator = await make_key(system, "default", "ask", "admin", "fleet")
    _, admin = await make_key(system, "default", "admin")
    _, asker = await make_key(system, "default", "ask")
    async with gateway(on_api(replace(settings, auth="required"), api), operator) as http:
        v1 = (await config_of(http))["version"]

        async def refused(why: str) -> dict[str, Any]:
            async def seen() -> bool:
                return why in ((await config_of(http))["last_error"] or "")

            await wait_until(seen, 2 * POLL_S + 1, f"last_error naming {why!r}")
            body = await config_of(http)
            assert body["version"] == v1 and body["source"] == "api"
            assert (await ask(http, "p")).status_code == 200  # the config in force serves on
            return body

        # When the API serves a pool whose deployment names no agent type
        bad = document({"p": 1, "q": 1})
        bad["pools"]["q"]["deployments"][0]["agent_type"] = "nope"
        api.serve(bad)
        # Then it is refused with the reason, and q is no pool
        body = await refused("pools.q.deployments[0].agent_type: unknown agent type 'nope'")
        assert (await http.get("/v1/pools/q")).status_code == 404
        errors = body["errors"]
        # (a tenant's admin key learns there was a refusal, not its reason; an ask key, nothing)
        tenant_view = (await http.get("/v1/config", headers={"X-API-Key": admin})).json()
        assert tenant_view["last_error"] == "refused (a key with the fleet scope sees why)"
        assert (await http.get("/v1/config", headers={"X-API-Key": asker})).status_code == 403

        # When it serves something that is not JSON, then a 500, then nothing it may read
        api.serve(b"{nope")
        assert (await refused("not valid JSON"))["errors"] > errors
        api.serve(b"", status=500)
        await refused("HTTP 500")
        api.serve(good, status=200)
        api.requests.clear()

        # Then, served a valid document again, the gateway is fine (same content: same version)
        async def fine() -> bool:
            body = await config_of(http)
            return body["last_error"] is None and bool(api.requests)

        await wait_until(fine, 2 * POLL_S + 1, "last_error cleared")
        assert (await config_of(http))["version"] == v1


async def test_reload_refuses_an_invalid_file_and_keeps_the_config(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a process running a pools file
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(document({"p": 1})))
    s = replace(settings, config_path=str(path))
    source = ConfigSource(s)
    source.load_file()
    applied: list[Config] = []

    async def apply(config: Config) -> None:
        applied.append(config)

    r = aredis.Redis.from_url(settings.redis_url)
    try:
        async with source.running(r, apply):
            v1 = source.status().version
            # When the file turns invalid and the process reloads
            bad = document({"p": 1})
            bad["pools"]["p"]["limits"]["max_depth"] = "ten"
            path.write_text(json.dumps(bad))
            status = await source.reload()
            # Then it is refused with the reason, and the config in force stays
            assert status.version == v1 and not applied
            assert status.last_error is not None
            assert "Expected `int`, got `str` - at `pools.p.limits.max_depth`" in status.last_error
            assert str(path) in status.last_error
            # When it is fixed with another pool, a reload applies it
            path.write_text(json.dumps(document({"p": 1, "q": 2})))
            status = await source.reload()
            assert status.last_error is None and status.version != v1 and status.source == "file"
            assert [list(c.pools) for c in applied] == [["p", "q"]]
            # And reloading the same content applies nothing
            await source.reload()
            assert len(applied) == 1
    finally:
        await r.aclose()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AGENTPOOL_CONFIG_URL": "ftp://host/pools"},
            "AGENTPOOL_CONFIG_URL: expected an http:// or https:// URL",
        ),
        ({"AGENTPOOL_CONFIG_URL": "http://u:secret@/x"}, "got 'http://u:***@/x'"),
        ({"AGENTPOOL_CONFIG_HEADERS": "Bearer x"}, "AGENTPOOL_CONFIG_HEADERS: expected a JSON object"),
        ({"AGENTPOOL_CONFIG_HEADERS": '["a"]'}, "AGENTPOOL_CONFIG_HEADERS: expected a JSON object"),
        ({"AGENTPOOL_CONFIG_HEADERS": '{"Authorization": 5}'}, "Expected `str`, got `int`"),
        ({"AGENTPOOL_CONFIG_HEADERS": '{"Bad Name": "x"}'}, "not a valid header name"),
        ({"AGENTPOOL_CONFIG_POLL_S": "0"}, "AGENTPOOL_CONFIG_POLL_S: expected more than 0"),
        ({"AGENTPOOL_CONFIG_POLL_S": "-1"}, "AGENTPOOL_CONFIG_POLL_S: expected more than 0"),
        ({"AGENTPOOL_CONFIG_POLL_S": "soon"}, "AGENTPOOL_CONFIG_POLL_S: expected a number, got 'soon'"),
    ],
)
def test_config_api_settings_fail_loudly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env(env)
    assert message in e.value.message
    assert "secret" not in e.value.message


def test_config_api_settings_parse() -> None:
    s = Settings.from_env(
        {
            "AGENTPOOL_CONFIG_URL": "https://config.internal/pools.json",
            "AGENTPOOL_CONFIG_HEADERS": '{"Authorization": "Bearer s3cret"}',
            "AGENTPOOL_CONFIG_POLL_S": "2.5",
        }
    )
    assert (s.config_url, s.config_headers, s.config_poll_s) == (
        "https://config.internal/pools.json",
        {"Authorization": "Bearer s3cret"},
        2.5,
    )
    assert "s3cret" not in repr(s)
    assert Settings.from_env({}).config_url is None


async def test_agentpool_reload_and_sighup_re_read_the_pools_file(
    settings: Settings, tmp_path: Path, made: set[str]
) -> None:
    # Given `agentpool gateway` running a pools file
    made.update({"p", "q"})
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(document({"p": 1})))
    env = {**subprocess_env(settings, path), "AGENTPOOL_LOG_FORMAT": "text"}
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "agentpool", "gateway", "--port", str(port), env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def up() -> bool:
                assert proc.returncode is None, "the gateway exited"
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/v1/config")).status_code == 200
                return False

            await wait_until(up, 30, "the gateway up")
            v1 = (await config_of(http))["version"]
            assert (await config_of(http))["source"] == "file"

            async def cli(*args: str) -> tuple[int, str, str]:
                done = await asyncio.create_subprocess_exec(
                    PYTHON, "-m", "agentpool", *args, env=env, stdout=-1, stderr=-1
                )
                out, err = await asyncio.wait_for(done.communicate(), 30)
                return int(done.returncode or 0), out.decode(), err.decode()

            async def version_is_not(v: str) -> bool:
                return bool((await config_of(http))["version"] != v)

            # When the file gains pool q and `agentpool reload` runs
            path.write_text(json.dumps(document({"p": 1, "q": 1})))
            code, out, _ = await cli("reload")
            # Then the gateway takes it
            assert code == 0 and "1 gateway/supervisor process(es)" in out, out
            await wait_until(lambda: version_is_not(v1), 10, "the reloaded config")
            assert (await http.get("/v1/pools/q")).status_code == 200
            v2 = (await config_of(http))["version"]

            # When the file turns invalid: `agentpool reload` refuses it with the reason, and
            # SIGHUP makes the gateway refuse it too, showing why and keeping its config
            path.write_text(json.dumps({"providers": {}, "agent_types": {}}))
            code, _, err = await cli("reload")
            assert code == 2 and "missing required field `pools`" in err, err
            proc.send_signal(signal.SIGHUP)

            async def refused() -> bool:
                return "pools" in ((await config_of(http))["last_error"] or "")

            await wait_until(refused, 10, "the refusal in /v1/config")
            assert (await config_of(http))["version"] == v2

            # When the file is fixed (q gone) and the gateway gets SIGHUP, it takes it
            path.write_text(json.dumps(document({"p": 1})))
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: version_is_not(v2), 10, "the config after SIGHUP")
            body = await config_of(http)
            assert body["version"] == v1 and body["last_error"] is None
            assert (await http.get("/v1/pools/q")).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


def test_the_config_round_trips_through_its_worker_file(tmp_path: Path) -> None:
    from agentpool.shared.config import load_config
    from agentpool.workers.procs import write_config

    config = config_from_data(document({"p": 2, "q": 1}))
    path = write_config(config, str(tmp_path), config_version(config))
    assert load_config(path) == config
    assert msgspec.json.decode(Path(path).read_bytes())["pools"]["p"]["deployments"][0]["replicas"] == 2
