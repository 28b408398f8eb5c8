"""MCP tool sources against real MCP servers (tests/mcp_server.py): stdio child processes and
streamable HTTP served by uvicorn in this event loop. No mocks: the faults are real (a killed
process, a stopped server, a closed port)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agentpool.shared.config import McpServer
from agentpool.workers.tools.base import Tool, ToolFailure, ToolSourceError
from agentpool.workers.tools.mcp import McpHttpServer, McpStdioServer, build_mcp_source
from tests.conftest import free_port, wait_until
from tests.mcp_server import Served, serving

STDIO = ["python", "-m", "tests.mcp_server"]
TOOLS = {"add", "echo", "slow", "fail", "getenv", "pid"}
Source = McpStdioServer | McpHttpServer
MakeSource = Callable[..., Source]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http_server() -> AsyncIterator[Served]:
    async with serving() as served:
        yield served


@pytest_asyncio.fixture(loop_scope="session")
async def make_source() -> AsyncIterator[MakeSource]:
    """Builds tool sources from McpServer fields; cleans up every one it made."""
    made: list[Source] = []

    def make(**fields: Any) -> Source:
        source = build_mcp_source(McpServer(**{"name": "files", **fields}))
        assert isinstance(source, McpStdioServer | McpHttpServer)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.cleanup()


@pytest_asyncio.fixture(loop_scope="session", params=["stdio", "http"])
async def connected(request: pytest.FixtureRequest, make_source: MakeSource, http_server: Served) -> Source:
    """A connected source over each transport (the HTTP one on the module's server)."""
    if request.param == "stdio":
        source = make_source(command=STDIO, timeout_s=1.0)
    else:
        source = make_source(url=http_server.url, timeout_s=1.0)
    await source.connect()
    return source


def tools(source: Source) -> dict[str, Tool]:
    return {t.name: t for t in source.tools()}


async def server_pid(source: Source) -> int:
    return int(await tools(source)["pid"].call({}))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def started_slow(source: Source, tmp_path: Path, seconds: float = 30) -> asyncio.Task[str]:
    """A ``slow`` call in flight: returns once the server has started running it."""
    marker = tmp_path / f"started-{time.monotonic_ns()}"
    task = asyncio.create_task(tools(source)["slow"].call({"seconds": seconds, "started_file": str(marker)}))
    await wait_until(lambda: marker.exists() or task.done(), 10, "the slow call to start")
    assert not task.done(), task
    return task


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_lists_and_calls(connected: Source) -> None:
    by_name = tools(connected)
    assert set(by_name) == TOOLS
    add = by_name["add"]
    assert add.spec.description == "Add two integers."
    assert add.spec.parameters["type"] == "object"
    assert set(add.spec.parameters["properties"]) == {"a", "b"}
    assert add.origin == "mcp server 'files'"
    assert add.timeout_s == 1.0
    assert await add.call({"a": 2, "b": 3}) == "5"
    assert await by_name["echo"].call({"text": "héllo"}) == "héllo"


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_prefix(make_source: MakeSource, http_server: Served) -> None:
    source = make_source(name="web", url=http_server.url, prefix="web")
    await source.connect()
    by_name = tools(source)
    assert set(by_name) == {f"web_{n}" for n in TOOLS}
    assert by_name["web_add"].origin == "mcp server 'web'"
    assert await by_name["web_add"].call({"a": 40, "b": 2}) == "42"


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_stdio_environment(make_source: MakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    # The child gets the configured env, but not the worker's own (its API keys, say)
    monkeypatch.setenv("AGENTPOOL_TEST_WORKER_SECRET", "sk-secret")
    source = make_source(command=STDIO, env={"AGENTPOOL_TEST_MCP": "on"})
    await source.connect()
    getenv = tools(source)["getenv"]
    assert await getenv.call({"name": "AGENTPOOL_TEST_MCP"}) == "on"
    assert await getenv.call({"name": "AGENTPOOL_TEST_WORKER_SECRET"}) == ""


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_is_error_is_a_tool_error(connected: Source) -> None:
    with pytest.raises(ToolFailure) as failed:
        await tools(connected)["fail"].call({})
    assert failed.value.error_code == "TOOL_ERROR"
    assert "failing on purpose" in failed.value.message
    with pytest.raises(ToolFailure) as bad_args:
        await tools(connected)["add"].call({"a": "x"})
    assert bad_args.value.error_code == "TOOL_ERROR"


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_timeout_leaves_the_session_usable(connected: Source) -> None:
    # Given a server whose calls may take 1 s
    pid = await server_pid(connected)
    # When a call runs longer
    t0 = time.monotonic()
    with pytest.raises(ToolFailure) as failed:
        await tools(connected)["slow"].call({"seconds": 30})
    # Then it fails as a timeout, on time, and the same session goes on answering
    assert failed.value.error_code == "TOOL_TIMEOUT"
    assert "'slow' timed out after 1s" in failed.value.message
    assert time.monotonic() - t0 < 5
    assert await server_pid(connected) == pid
    assert await tools(connected)["echo"].call({"text": "still here"}) == "still here"


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_cancelling_a_call_is_prompt(connected: Source, tmp_path: Path) -> None:
    pid = await server_pid(connected)
    task = await started_slow(connected, tmp_path)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 1
    assert connected.connected
    assert await tools(connected)["echo"].call({"text": "after"}) == "after"
    assert await server_pid(connected) == pid


@pytest.mark.chaos
@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="session")
async def test_killed_stdio_server_fails_the_call_and_the_next_call_restarts_it(
    make_source: MakeSource, tmp_path: Path
) -> None:
    # Given a stdio server with a call in flight
    source = make_source(command=STDIO, timeout_s=20)
    await source.connect()
    pid = await server_pid(source)
    task = await started_slow(source, tmp_path)
    # When its process is killed
    os.kill(pid, signal.SIGKILL)
    # Then the call in flight fails as MCP_UNAVAILABLE, at once
    with pytest.raises(ToolFailure) as failed:
        await asyncio.wait_for(task, 10)
    assert failed.value.error_code == "MCP_UNAVAILABLE"
    assert "mcp server 'files'" in failed.value.message
    # And the next call starts a new process and works
    new_pid = await server_pid(source)
    assert new_pid != pid
    assert await tools(source)["add"].call({"a": 1, "b": 1}) == "2"
    assert not alive(pid)


@pytest.mark.chaos
@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="session")
async def test_idle_stdio_server_killed_is_restarted_without_a_failed_call(make_source: MakeSource) -> None:
    source = make_source(command=STDIO)
    await source.connect()
    pid = await server_pid(source)
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not source.connected, 10, "the source to notice the process is gone")
    assert await tools(source)["echo"].call({"text": "back"}) == "back"
    assert await server_pid(source) != pid


@pytest.mark.chaos
@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="session")
async def test_http_server_restarted_is_reconnected(make_source: MakeSource, tmp_path: Path) -> None:
    # Given a source connected to a server that then stops with a call in flight
    port = free_port()
    async with serving(port) as served:
        source = make_source(name="web", url=served.url, timeout_s=20)
        await source.connect()
        task = await started_slow(source, tmp_path)
    # Then that call fails as MCP_UNAVAILABLE, and so does one while the server is down
    with pytest.raises(ToolFailure) as in_flight:
        await asyncio.wait_for(task, 10)
    assert in_flight.value.error_code == "MCP_UNAVAILABLE"
    with pytest.raises(ToolFailure) as while_down:
        await tools(source)["echo"].call({"text": "anyone?"})
    assert while_down.value.error_code == "MCP_UNAVAILABLE"
    assert served.url in while_down.value.message
    # When the server is back on its port, the next call reconnects and works
    async with serving(port):
        assert await tools(source)["echo"].call({"text": "back"}) == "back"


@pytest.mark.chaos
@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="session")
async def test_http_server_restarted_while_idle_is_transparent(make_source: MakeSource) -> None:
    # Given a source whose server restarts between calls (and so forgets the session)
    port = free_port()
    async with serving(port) as served:
        source = make_source(name="web", url=served.url)
        await source.connect()
        assert await tools(source)["add"].call({"a": 1, "b": 2}) == "3"
    async with serving(port):
        # Then the next call, refused for its unknown session, is sent again on a new one
        assert await tools(source)["add"].call({"a": 2, "b": 2}) == "4"
        assert source.connected


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_unreachable_url(make_source: MakeSource) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"  # a closed port
    source = make_source(name="web", url=url)
    with pytest.raises(ToolSourceError) as failed:
        await source.connect()
    assert failed.value.retryable
    assert f"mcp server 'web' ({url}) is unreachable: ConnectError" in failed.value.message
    assert source.tools() == []


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_missing_command_is_not_retryable(make_source: MakeSource) -> None:
    source = make_source(command=["agentpool-no-such-mcp-server", "--stdio"])
    with pytest.raises(ToolSourceError) as failed:
        await source.connect()
    assert not failed.value.retryable
    assert "agentpool-no-such-mcp-server" in failed.value.message
    assert "FileNotFoundError" in failed.value.message


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_command_that_exits_at_start(make_source: MakeSource) -> None:
    source = make_source(command=["python", "-c", "pass"])
    with pytest.raises(ToolSourceError) as failed:
        await source.connect()
    assert failed.value.retryable
    assert "exited while starting" in failed.value.message


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_connect_timeout(make_source: MakeSource) -> None:
    source = make_source(command=["python", "-c", "import time; time.sleep(60)"], connect_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(ToolSourceError) as failed:
        await source.connect()
    assert "did not finish connecting within 0.5s" in failed.value.message
    assert time.monotonic() - t0 < 7  # the timeout, then the SDK stopping the process


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_cleanup_stops_the_process_and_the_source(make_source: MakeSource) -> None:
    source = make_source(command=STDIO)
    await source.connect()
    await source.connect()  # already connected: a no-op
    pid = await server_pid(source)
    add = tools(source)["add"]
    t0 = time.monotonic()
    await source.cleanup()
    assert time.monotonic() - t0 < 5
    assert not alive(pid)
    await source.cleanup()  # twice is fine
    with pytest.raises(ToolSourceError) as reopened:
        await source.connect()
    assert not reopened.value.retryable
    with pytest.raises(ToolFailure) as called:
        await add.call({"a": 1, "b": 2})
    assert called.value.error_code == "MCP_UNAVAILABLE"


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_cleanup_from_another_task(make_source: MakeSource, tmp_path: Path) -> None:
    # Given a source connected in one task, with a call in flight
    source = make_source(command=STDIO, timeout_s=20)
    await asyncio.create_task(source.connect())
    pid = await server_pid(source)
    task = await started_slow(source, tmp_path)
    # When another task cleans it up
    await asyncio.create_task(source.cleanup())
    # Then the call fails and the process is gone
    with pytest.raises(ToolFailure) as failed:
        await asyncio.wait_for(task, 5)
    assert failed.value.error_code == "MCP_UNAVAILABLE"
    assert failed.value.message == "mcp server 'files' was closed during tool 'slow'"
    assert not alive(pid)


@pytest.mark.timeout(30)
@pytest.mark.asyncio(loop_scope="session")
async def test_support_example(make_source: MakeSource) -> None:
    source = make_source(name="support", command=["python", "-m", "examples.mcp_support.server"])
    await source.connect()
    lookup = tools(source)["lookup_order"]
    order = json.loads(await lookup.call({"order_id": "A1001"}))
    assert order["status"] == "shipped"
    assert order["items"]
    with pytest.raises(ToolFailure) as unknown:
        await lookup.call({"order_id": "Z9"})
    assert unknown.value.error_code == "TOOL_ERROR"
    assert "Z9" in unknown.value.message
