"""MCP tools inside pools: replicas connect at warm-up, offer the server's tools, survive its death.

The servers are written with the ``mcp`` SDK (tests/mcp_server.py), over stdio (a process each
replica starts) and over streamable HTTP (served in this event loop).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from agentpool.shared.messages import End, ToolResult
from tests.conftest import System, free_port, wait_until
from tests.mcp_server import serving
from tests.test_agents import collect, pools

pytestmark = pytest.mark.timeout(60)
STDIO = '{ name = "t", command = ["python", "-m", "tests.mcp_server"] }'


def results(events: list[object]) -> list[ToolResult]:
    return [e for e in events if isinstance(e, ToolResult)]


async def test_stdio_server_tools_are_offered_and_called(make_system) -> None:
    system: System = await make_system(pools(f"mcp_servers = [{STDIO}]"))
    worker = next(iter(system.workers.values()))
    assert {"add", "echo", "slow", "pid"} <= set(worker.toolbox.tools)
    events = await collect(system, 'What is 2 + 3? @add {"a": 2, "b": 3}')
    [result] = results(events)
    assert result.content == "5" and not result.is_error
    end = events[-1]
    assert isinstance(end, End) and "add returned: 5" in end.content


async def test_streamable_http_server_with_a_prefix(make_system) -> None:
    async with serving() as served:
        server = f'{{ name = "web", url = "{served.url}", prefix = "web" }}'
        system: System = await make_system(pools(f"mcp_servers = [{server}]"))
        events = await collect(system, '@web_echo {"text": "over http"}')
        [result] = results(events)
        assert result.name == "web_echo" and result.content == "over http"
        assert isinstance(events[-1], End) and "over http" in events[-1].content


async def test_killing_the_stdio_server_mid_call_is_an_error_result_then_it_comes_back(
    make_system, tmp_path: Path
) -> None:
    system: System = await make_system(pools(f"mcp_servers = [{STDIO}]"))
    [pid_result] = results(await collect(system, "@pid {}"))
    pid = int(pid_result.content)
    started = tmp_path / "started"
    # When the server dies while a call of the agent is in flight
    call = asyncio.create_task(collect(system, f'@slow {{"seconds": 30, "started_file": "{started}"}}'))
    await wait_until(started.exists, 15, "the slow call to start")
    os.kill(pid, signal.SIGKILL)
    events = await asyncio.wait_for(call, 20)
    # Then the model gets an error result and the request still ends with an answer
    [failed] = results(events)
    assert failed.is_error and failed.error_code == "MCP_UNAVAILABLE", failed
    assert isinstance(events[-1], End)
    # And the next request works, on a new server process
    [again] = results(await collect(system, '@add {"a": 1, "b": 1}'))
    assert again.content == "2" and not again.is_error
    [new_pid] = results(await collect(system, "@pid {}"))
    assert int(new_pid.content) != pid


async def test_an_unreachable_http_server_leaves_the_replica_unhealthy_with_the_reason(make_system) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    config = pools(f'mcp_servers = [{{ name = "gone", url = "{url}" }}]')
    system: System = await make_system(config, start=False)
    worker = await system.start_worker("a", "main", 1, wait=False)
    await wait_until(lambda: worker.info.status == "unhealthy", 20, "unhealthy")
    assert "gone" in worker.info.detail and "unreachable" in worker.info.detail, worker.info.detail

    async def reported() -> bool:  # what the pools API and `agentpool status` show
        status = await system.client.fleet.status("a")
        return [(r.status, "unreachable" in r.detail) for r in status.replicas] == [("unhealthy", True)]

    await wait_until(reported, 5, "the unhealthy replica and its reason in the pool status")
    await system.client.refresh_membership()
    assert system.client.router.members("a") == []


async def test_a_server_that_comes_up_later_makes_the_replica_ready(make_system) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    config = pools(f'mcp_servers = [{{ name = "late", url = "{url}" }}]')
    system: System = await make_system(config, start=False)
    worker = await system.start_worker("a", "main", 1, wait=False)
    await wait_until(lambda: worker.info.status == "unhealthy", 20, "unhealthy while the server is down")
    async with serving(port):
        await asyncio.wait_for(worker.ready.wait(), 20)
        assert worker.info.status == "ready" and worker.info.detail == ""
        await system.wait_members("a")
        [result] = results(await collect(system, '@echo {"text": "late but here"}'))
        assert result.content == "late but here"


async def test_two_servers_offering_one_name_is_a_clash_naming_both(make_system) -> None:
    second = '{ name = "u", command = ["python", "-m", "tests.mcp_server"] }'
    system: System = await make_system(pools(f"mcp_servers = [{STDIO}, {second}]"), start=False)
    worker = await system.start_worker("a", "main", 1, wait=False)
    await wait_until(lambda: worker.info.status == "unhealthy", 20, "unhealthy")
    assert "offered twice" in worker.info.detail
    assert "mcp server 't'" in worker.info.detail and "mcp server 'u'" in worker.info.detail
