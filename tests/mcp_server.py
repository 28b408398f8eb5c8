"""A small MCP server for the tests, written with the ``mcp`` SDK: stdio or streamable HTTP.

``python -m tests.mcp_server`` serves it over stdio (the worker starts it as a child process);
:func:`serving` serves it over streamable HTTP with uvicorn on a free loopback port, in the
current event loop, so a test can stop it and start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.applications import Starlette

MCP_PATH = "/mcp"


def build_server() -> MCPServer:
    """A fresh server (an HTTP app's session manager runs once, so each serving needs its own)."""
    server: MCPServer = MCPServer("agentpool-test", log_level="WARNING")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    async def slow(seconds: float, started_file: str = "") -> str:
        """Sleep for ``seconds``, then say so; first create ``started_file`` (a test waits for it)."""
        if started_file:
            Path(started_file).touch()  # noqa: ASYNC240 (one tiny local write, in a test server)
        await asyncio.sleep(seconds)
        return f"slept {seconds:g}s"

    @server.tool()
    def fail() -> str:
        """Always fail (the client sees an isError result)."""
        raise ToolError("failing on purpose")

    @server.tool()
    def getenv(name: str) -> str:
        """The server's environment variable ``name`` ("" when unset)."""
        return os.environ.get(name, "")

    @server.tool()
    def pid() -> int:
        """The server's process id (a test kills it)."""
        return os.getpid()

    return server


def build_app() -> Starlette:
    """The streamable HTTP ASGI app, endpoint ``/mcp``; its lifespan runs the session manager."""
    return build_server().streamable_http_app(streamable_http_path=MCP_PATH)


@dataclass
class Served:
    url: str  # the MCP endpoint, http://127.0.0.1:<port>/mcp
    port: int


@contextlib.asynccontextmanager
async def serving(port: int | None = None) -> AsyncIterator[Served]:
    """The test server over streamable HTTP on ``port`` (a free one unless told), in this loop."""
    import uvicorn  # imported here: the stdio child runs this module and needs none of these

    from agentpool.gateway.server import EmbeddedServer
    from tests.conftest import free_port, wait_until

    port = port or free_port()
    config = uvicorn.Config(
        build_app(),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    srv = EmbeddedServer(config)
    task = asyncio.create_task(srv.serve())
    await wait_until(lambda: srv.started or task.done(), 10, "MCP test server start")
    if task.done():
        await task  # raises what stopped it (the port in use, say)
        raise RuntimeError("the MCP test server stopped at start")
    try:
        yield Served(url=f"http://127.0.0.1:{port}{MCP_PATH}", port=port)
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


if __name__ == "__main__":
    build_server().run("stdio")
