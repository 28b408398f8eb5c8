"""What a new user runs into in the first hour, each made to explain itself.

A second ``agentpool dev`` on a taken port, a key created while ``agentpool dev`` runs, an
unhealthy replica in ``agentpool status``, a sampling parameter the provider cannot take, a
``{VAR}`` nobody filled, a misspelt field: each gets one clear message and touches nothing else.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from agentpool.gateway.keys import KeyStore
from agentpool.shared.config import parse_config
from agentpool.shared.errors import BadRequest, ConfigError
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings
from tests.conftest import (
    PYTHON,
    System,
    cleanup_namespace,
    free_port,
    running_gateway,
    subprocess_env,
    wait_until,
)
from tests.fleet_support import end_process, pools_file

pytestmark = pytest.mark.timeout(90)


def cli(settings: Settings, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in subprocess_env(settings, path).items() if k != "AGENTPOOL_AUTH"}
    return subprocess.run(
        [PYTHON, "-m", "agentpool", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


class Output:
    """A process's merged output, read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.text = ""
        self._task = asyncio.create_task(self._read(proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            self.text += line.decode()

    async def close(self) -> None:
        await asyncio.wait_for(self._task, 10)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_second_dev_on_a_taken_port_says_who_holds_it_and_leaves_the_first_alone(
    settings: Settings, tmp_path: Path
) -> None:
    path, config = pools_file(tmp_path)
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in subprocess_env(settings, path).items() if k != "AGENTPOOL_AUTH"}
    first = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "agentpool",
        "dev",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = Output(first)
    try:
        await wait_until(lambda: "X-API-Key: ap_" in out.text, 30, "the dev key printed")
        key = re.search(r"X-API-Key: (ap_\S+?)'", out.text).group(1)  # type: ignore[union-attr]
        assert out.text.startswith("auth: open (agentpool dev;"), out.text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/v1/keys", headers={"x-api-key": key})).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, 30, "the first instance answers with its dev key")

            # When a second instance starts on the same port (another metrics port)
            second = await asyncio.to_thread(
                cli, settings, path, "dev", "--port", str(port), "--metrics-port", str(free_port())
            )

            # Then it exits 4 with one line naming the port and the first instance's process
            assert second.returncode == 4, second
            assert second.stdout == ""
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert f"port {port} on 127.0.0.1 is in use by pid {first.pid} (agentpool dev" in lines[0]
            assert "--port" in lines[0]
            # the metrics port is checked the same way, and so is `agentpool gateway`
            third = await asyncio.to_thread(
                cli, settings, path, "dev", "--port", str(free_port()), "--metrics-port", str(metrics_port)
            )
            assert third.returncode == 4 and f"port {metrics_port}" in third.stderr, third
            gateway = await asyncio.to_thread(
                cli, settings, path, "gateway", "--host", "127.0.0.1", "--port", str(port)
            )
            assert gateway.returncode == 4 and "Traceback" not in gateway.stderr, gateway

            # and the first instance's key still works: nothing of it was touched
            keys = await http.get("/v1/keys", headers={"x-api-key": key})
            assert keys.status_code == 200, keys.text
            assert [k["source"] for k in keys.json()["keys"]] == ["dev"]

            # A key created while dev runs leaves dev open (it said at start that `gateway` is not)
            created = await asyncio.to_thread(cli, settings, path, "keys", "create", "--tenant", "acme")
            assert created.returncode == 0, created
            assert "`agentpool gateway` requires a key unless AGENTPOOL_AUTH=open" in out.text
            anonymous = await http.post("/v1/ask/p", json={"content": "still open?"})
            assert anonymous.status_code == 200, anonymous.text
    finally:
        await end_process(first)
        await out.close()
        await cleanup_namespace(settings, config)
    assert first.returncode == 0, out.text
    assert "Traceback" not in out.text
    # its dev key went with it
    redis = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(settings.redis_url)
    try:
        store = KeyStore(redis, Names(settings.namespace))
        assert [k.source for k in await store.list()] == []  # (cleanup removed acme's too)
    finally:
        await redis.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_the_gateways_401_says_why_and_how_to_get_a_key(make_system, settings: Settings) -> None:
    system: System = await make_system(replicas=1)
    closed = replace(settings, auth="required")  # what `agentpool gateway` runs with by default
    async with running_gateway(closed, system.config) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/ask/p", json={"content": "hi"})
    assert r.status_code == 401, r.text
    assert "AGENTPOOL_AUTH=required" in r.json()["error"] and "agentpool keys create" in r.json()["error"]


UNHEALTHY = """
[providers.fake]
kind = "fake"

[agent_types.broken]
provider = "fake"
tools = ["tests.agents_support:missing_tool"]

[pools.a]
limits = { concurrency = 2, max_depth = 4 }

[[pools.a.deployments]]
name = "main"
agent_type = "broken"
replicas = 1
"""


@pytest.mark.asyncio(loop_scope="session")
async def test_an_unhealthy_replica_shows_its_reason_in_status_and_the_pools_api(
    make_system, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(UNHEALTHY)
    system: System = await make_system(parse_config(UNHEALTHY, str(path)), start=False)
    await system.start_worker("a", "main", 1, wait=False)

    async def beats_unhealthy() -> bool:
        return [r.status for r in await system.client.registry.replicas("a")] == ["unhealthy"]

    await wait_until(beats_unhealthy, 15, "an unhealthy heartbeat")

    status = await asyncio.to_thread(cli, settings, path, "status", "a")
    assert status.returncode == 0, status
    (row,) = [ln for ln in status.stdout.splitlines() if ln.startswith("a-main-1")]
    assert "unhealthy" in row and "missing_tool" in row, status.stdout

    async with running_gateway(settings, system.config) as url, httpx.AsyncClient(base_url=url) as http:
        pool = (await http.get("/v1/pools/a")).json()
    (replica,) = pool["replicas"]
    assert replica["status"] == "unhealthy" and "missing_tool" in replica["detail"], replica


def test_sampling_parameters_the_provider_cannot_take_are_refused_at_load() -> None:
    base = """
[providers.claude]
kind = "anthropic"
api_key_env = "K"

[providers.gpt]
kind = "openai"
api_key_env = "K"

[agent_types.a]
provider = "{provider}"
{extra}

[pools.p]
[[pools.p.deployments]]
name = "main"
agent_type = "a"
"""
    with pytest.raises(ConfigError) as e:
        parse_config(base.format(provider="claude", extra="temperature = 0.2\ntop_p = 0.9"), "pools.toml")
    assert "agent_types.a.temperature: the anthropic provider cannot take it" in e.value.message
    assert "agent_types.a.top_p: the anthropic provider cannot take it" in e.value.message
    assert (
        parse_config(base.format(provider="claude", extra=""), "pools.toml").agent_types["a"].temperature
        is None
    )
    gpt = parse_config(base.format(provider="gpt", extra="temperature = 0.2"), "pools.toml")
    assert gpt.agent_types["a"].temperature == 0.2


VARIABLES = """
[providers.fake]
kind = "fake"

[agent_types.v]
provider = "fake"
system_prompt = "You help with {PRODUCT} in a {TONE} tone."
variables = { TONE = "calm" }

[pools.v]
limits = { concurrency = 2, max_depth = 4 }

[[pools.v.deployments]]
name = "main"
agent_type = "v"
replicas = 1
"""


@pytest.mark.asyncio(loop_scope="session")
async def test_an_unfilled_prompt_variable_is_a_400_naming_it(make_system, settings: Settings) -> None:
    system: System = await make_system(parse_config(VARIABLES, "pools.toml"))
    async with (
        running_gateway(settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        refused = await http.post("/v1/ask/v", json={"content": "hi"})
        given = await http.post(
            "/v1/ask/v", json={"content": "hi", "context_variables": {"PRODUCT": "rockets"}}
        )
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error_code"] == "CONTEXT_VARIABLE_MISSING"
    assert body["details"] == {"field": "context_variables.PRODUCT", "missing": ["PRODUCT"]}
    assert "{PRODUCT}" in body["error"] and "[agent_types.v] variables" in body["error"]
    assert given.status_code == 200, given.text
    # the Python client refuses it the same way, before anything is queued
    with pytest.raises(BadRequest) as e:
        await system.client.ask("v", "hi")
    assert e.value.error_code == "CONTEXT_VARIABLE_MISSING"
    assert system.workers["v-main-1"].info.processed == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_an_unknown_field_is_named(make_system, settings: Settings) -> None:
    system: System = await make_system(replicas=1)
    async with running_gateway(settings, system.config) as url, httpx.AsyncClient(base_url=url) as http:
        typo = await http.post("/v1/ask/p", json={"content": "hi", "thread": "t-1"})
    assert typo.status_code == 400 and typo.json()["details"] == {"field": "thread"}, typo.text
    assert "unknown field `thread`" in typo.json()["error"]


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (
            ["status"],
            {"AGENTPOOL_PORT": "80x"},
            2,
            "agentpool: AGENTPOOL_PORT: expected a port number, got '80x'",
        ),
        (["status", "nosuch"], {}, 2, "agentpool: no pool named 'nosuch'"),
        (["wait", "nosuch"], {}, 2, "agentpool: no pool named 'nosuch'"),
        (["scale", "p", "nope", "2"], {}, 2, "agentpool: no deployment 'nope' in pool 'p'"),
        (
            ["status"],
            {"AGENTPOOL_CONFIG": "/nonexistent.toml"},
            2,
            "agentpool: /nonexistent.toml: cannot read",
        ),
        (
            ["status"],
            {"AGENTPOOL_REDIS_URL": "redis://127.0.0.1:1/0"},
            3,
            "agentpool: Redis is not reachable",
        ),
    ],
)
def test_a_command_that_cannot_work_says_why_in_one_line(
    settings: Settings, tmp_path: Path, args: list[str], env: dict[str, str], code: int, message: str
) -> None:
    path, _ = pools_file(tmp_path)
    proc = subprocess.run(
        [PYTHON, "-m", "agentpool", *args],
        env={**subprocess_env(settings, path), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == code, proc
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
