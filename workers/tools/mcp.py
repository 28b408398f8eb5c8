"""MCP servers as tool sources, one class per transport: :class:`McpStdioServer`, :class:`McpHttpServer`.

The SDK's transports and ``ClientSession`` are anyio context managers whose cancel scopes must be
entered and left by one task, so each connection has an owner task (:class:`_Connection`) that
enters them on an ``AsyncExitStack``, initializes, lists the tools and parks until it is told to
stop or the server goes away. ``connect()``, ``cleanup()`` and tool calls may come from any task:
a call only sends on the session's streams. A lost connection (the process killed, the HTTP
server gone) fails the calls in flight with ``MCP_UNAVAILABLE``; the next call reconnects.

Only imported when an agent type has ``mcp_servers``, so other replicas never load the SDK.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import json
import logging
import shlex
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import cache
from importlib import metadata
from types import TracebackType
from typing import Any, Self

import anyio
import httpx2
import mcp_types
from mcp.client import ClientSession, Transport
from mcp.client._transport import ReadStream
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from agentpool.shared.config import McpServer
from agentpool.workers.providers.base import ToolSpec
from agentpool.workers.tools.base import Tool, ToolFailure, ToolSource, ToolSourceError

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 4.0  # a stopping session may close stdin, wait for the process, then signal it
CLOSE_TIMEOUT_S = 5.0  # cleanup() never takes longer than this
MAX_LIST_PAGES = 100  # a tools/list paginator that never ends cannot hang warm-up
_CONNECTION_ERRORS = (httpx2.TransportError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


class McpTool(Tool):
    """One tool of an MCP server, offered under its own name or as ``{prefix}_{name}``."""

    def __init__(self, source: _McpSource, listed: mcp_types.Tool) -> None:
        prefix = source.config.prefix
        self.spec = ToolSpec(
            name=f"{prefix}_{listed.name}" if prefix else listed.name,
            description=listed.description or listed.title or "",
            parameters=listed.input_schema,
        )
        self.origin = source.origin
        self.timeout_s = source.config.timeout_s
        self.remote_name = listed.name
        self._source = source

    async def call(self, arguments: dict[str, Any]) -> str:
        return await self._source.call_tool(self.remote_name, arguments)


class _McpSource(ToolSource):
    """Connection management shared by the transports; a subclass says how to open the transport."""

    _lost_at_connect = "is unreachable"  # how a connection lost while starting reads in the error

    def __init__(self, config: McpServer) -> None:
        self.config = config
        self.name = config.name
        self.origin = f"mcp server {config.name!r}"
        self._conn: _Connection | None = None
        self._tools: list[Tool] = []
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """The server and where it is, for error messages: ``mcp server 'web' (http://...)``."""

    @abc.abstractmethod
    def _transport(self) -> Transport:
        """A fresh transport context manager (entered by the owner task)."""

    @property
    def connected(self) -> bool:
        """Whether a session is up (False once the server is known to be gone, until a reconnect)."""
        return self._conn is not None and self._conn.usable

    async def connect(self) -> None:
        """Connect and list the tools within ``connect_timeout_s``; a no-op when already connected."""
        await self._ensure()

    def tools(self) -> list[Tool]:
        return list(self._tools)

    async def cleanup(self) -> None:
        """Stop the session (and a stdio server's process) within CLOSE_TIMEOUT_S; never raises."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> str:
        """Call the server's tool ``name`` (its own name, unprefixed) within ``timeout_s``.

        A call the server refused because it no longer knows the session (an HTTP server that
        restarted) never ran, so it is sent once more on a new session.
        """
        for attempt in (1, 2):
            conn = await self._live()
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    result = await conn.session.call_tool(name, arguments)
            except Exception as e:
                kind, detail = _classify(e)
                if kind in ("lost", "expired"):
                    conn.mark_lost()
                if kind == "expired" and attempt == 1:
                    continue
                raise self._call_failure(name, kind, detail) from e
            return _result_text(self.origin, name, result)
        raise AssertionError("unreachable")

    async def _live(self) -> _Connection:
        """The connection to call on, reconnecting first if the last one was lost."""
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        try:
            return await self._ensure()
        except ToolSourceError as e:
            raise ToolFailure(e.message, "MCP_UNAVAILABLE") from None

    async def _ensure(self) -> _Connection:
        """A usable connection: the current one, one still starting, or a new one."""
        async with self._lock:
            if self._closed:
                raise ToolSourceError(f"{self.label} is closed", retryable=False)
            conn = self._conn
            if conn is None or conn.lost:
                if conn is not None:
                    await conn.close()
                conn = self._conn = _Connection(self.label, self._transport)
            try:
                await conn.wait_ready(self.config.connect_timeout_s)
            except asyncio.CancelledError:
                raise  # the caller gave up; the connection goes on starting for the next one
            except Exception as e:
                await conn.close()
                if self._closed:
                    raise ToolSourceError(f"{self.label} is closed", retryable=False) from None
                raise self._connect_error(*_classify(e)) from None
            self._tools = [McpTool(self, t) for t in conn.listed]
            return conn

    def _connect_error(self, kind: str, detail: str) -> ToolSourceError:
        if kind == "missing":
            return ToolSourceError(f"{self.label} cannot start: {detail}", retryable=False)
        if kind == "timeout":
            limit = self.config.connect_timeout_s
            return ToolSourceError(f"{self.label} did not finish connecting within {limit:g}s")
        if kind == "lost":
            return ToolSourceError(f"{self.label} {self._lost_at_connect}: {detail}")
        if kind in ("refused", "expired"):
            return ToolSourceError(f"{self.label} refused the connection: {detail}")
        return ToolSourceError(f"{self.label} cannot be connected: {detail}")

    def _call_failure(self, name: str, kind: str, detail: str) -> ToolFailure:
        if self._closed:
            return ToolFailure(f"{self.origin} was closed during tool {name!r}", "MCP_UNAVAILABLE")
        if kind == "timeout":
            return ToolFailure(
                f"{self.origin} tool {name!r} timed out after {self.config.timeout_s:g}s", "TOOL_TIMEOUT"
            )
        if kind in ("lost", "expired", "missing"):
            return ToolFailure(
                f"{self.origin} went away during tool {name!r} ({detail}); the next call reconnects",
                "MCP_UNAVAILABLE",
            )
        if kind == "refused":
            return ToolFailure(f"{self.origin} rejected tool {name!r}: {detail}", "TOOL_ERROR")
        return ToolFailure(f"{self.origin} tool {name!r} failed: {detail}", "TOOL_ERROR")


class McpStdioServer(_McpSource):
    """An MCP server the replica runs as a child process, talking JSON-RPC over its stdin/stdout.

    A first word ``python`` is this worker's interpreter. The child gets the SDK's minimal
    environment (PATH, HOME, ...) plus ``env``, not the worker's secrets.
    """

    _lost_at_connect = "exited while starting"

    def __init__(self, config: McpServer) -> None:
        if not config.command:
            raise ValueError(f"mcp server {config.name!r}: a stdio server needs a command")
        super().__init__(config)
        self.command = config.command

    @property
    def label(self) -> str:
        return f"{self.origin} ({shlex.join(self.command)})"

    def _transport(self) -> Transport:
        program, *args = self.command
        params = StdioServerParameters(
            command=sys.executable if program == "python" else program,
            args=args,
            env=dict(self.config.env) or None,
        )
        return stdio_client(params)


class McpHttpServer(_McpSource):
    """An MCP server reached over streamable HTTP at ``url`` (the endpoint, e.g. ``.../mcp``)."""

    def __init__(self, config: McpServer) -> None:
        if not config.url:
            raise ValueError(f"mcp server {config.name!r}: an HTTP server needs a url")
        super().__init__(config)
        self.url = config.url

    @property
    def label(self) -> str:
        return f"{self.origin} ({self.url})"

    def _transport(self) -> Transport:
        return streamable_http_client(self.url)


def build_mcp_source(config: McpServer) -> ToolSource:
    """The tool source for one ``[[agent_types.X.mcp_servers]]`` entry (url: HTTP, else stdio)."""
    if config.url is not None:
        return McpHttpServer(config)
    return McpStdioServer(config)


class _Connection:
    """One MCP session, owned by one task from the transport's opening to its closing."""

    def __init__(self, label: str, open_transport: Callable[[], Transport]) -> None:
        self.label = label
        self.listed: list[mcp_types.Tool] = []
        self.lost = False  # the owner task has ended, or a call found the server gone
        self.error: Exception | None = None  # why the owner task ended, if it failed
        self._open_transport = open_transport
        self._session: ClientSession | None = None
        self._settled = asyncio.Event()  # ready, or failed
        self._wake = asyncio.Event()  # stop, or the server went away
        self._scope = anyio.CancelScope()
        self._task = asyncio.create_task(self._own(), name=f"mcp session: {label}")

    @property
    def usable(self) -> bool:
        return self._session is not None and not self.lost

    @property
    def session(self) -> ClientSession:
        if self._session is None:
            raise MCPError(mcp_types.CONNECTION_CLOSED, "Not connected")
        return self._session

    def mark_lost(self) -> None:
        """A call found the server gone: let the owner task close the session."""
        self.lost = True
        self._wake.set()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait for initialize and tools/list; raise why the session could not start."""
        async with asyncio.timeout(timeout_s):
            await self._settled.wait()
        if self.error is not None:
            raise self.error
        if not self.usable:
            raise MCPError(mcp_types.CONNECTION_CLOSED, "Connection closed")

    async def close(self) -> None:
        """Stop the owner task; cancel it if the SDK's own shutdown overruns. Never raises."""
        self.lost = True
        self._wake.set()
        if self._session is None:
            self._scope.cancel()  # still starting: nothing to close gracefully
        if await self._finished_within(CLOSE_GRACE_S):
            return
        self._scope.cancel()  # an anyio cancel still lets the SDK's shielded process shutdown run
        if await self._finished_within(CLOSE_TIMEOUT_S - CLOSE_GRACE_S):
            return
        log.warning("%s: the session did not close within %gs; abandoning it", self.label, CLOSE_TIMEOUT_S)
        self._task.cancel()

    async def _finished_within(self, timeout_s: float) -> bool:
        await asyncio.wait([self._task], timeout=timeout_s)
        return self._task.done()

    async def _own(self) -> None:
        with self._scope:
            try:
                async with AsyncExitStack() as stack:
                    read, write = await stack.enter_async_context(self._open_transport())
                    watched = _EndWatch(read, self._wake.set)
                    session = ClientSession(watched, write, client_info=_client_info())
                    await stack.enter_async_context(session)
                    await session.initialize()
                    self.listed = await _list_tools(session)
                    self._session = session
                    self._settled.set()
                    await self._wake.wait()
                    if not self.lost:
                        log.warning("%s went away; the next call reconnects", self.label)
            except Exception as e:
                self.error = e
                if self._session is not None:
                    log.warning("%s: the session failed: %s", self.label, _classify(e)[1])
            finally:
                self.lost = True
                self._settled.set()


class _EndWatch:
    """The session's read stream, telling the owner task when it ends (the server went away)."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> contextvars.Context | None:
        """The sender's context, which the dispatcher reads off the HTTP transport's streams."""
        context: contextvars.Context | None = getattr(self._inner, "last_context", None)
        return context

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def _list_tools(session: ClientSession) -> list[mcp_types.Tool]:
    listed: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_LIST_PAGES):
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        listed += page.tools
        cursor = page.next_cursor
        if not cursor:
            break
    return listed


def _result_text(origin: str, name: str, result: mcp_types.CallToolResult) -> str:
    """The text blocks joined (the structured result as JSON if there is no text); isError raises."""
    texts = [block.text for block in result.content if isinstance(block, mcp_types.TextContent)]
    if texts:
        text = "\n".join(texts)
    elif result.structured_content is not None:
        text = json.dumps(result.structured_content)
    else:  # images, audio, resources: say what came back
        text = " ".join(f"[{block.type} content]" for block in result.content)
    if result.is_error:
        raise ToolFailure(text or f"{origin} tool {name!r} failed", "TOOL_ERROR")
    return text


def _classify(exc: BaseException) -> tuple[str, str]:
    """What an SDK or transport error means, and a line saying why: the one place they are read.

    Kinds: ``missing`` (the command cannot start), ``lost`` (no connection: refused, closed,
    killed), ``expired`` (the HTTP server no longer knows the session), ``timeout``, ``refused``
    (an MCP error answer), ``error``.
    """
    exc = _leaf(exc)
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError | PermissionError | NotADirectoryError):
        return "missing", detail
    if isinstance(exc, TimeoutError):
        return "timeout", detail
    if isinstance(exc, MCPError):
        if exc.code == mcp_types.REQUEST_TIMEOUT:
            return "timeout", exc.message
        if exc.code == mcp_types.CONNECTION_CLOSED:
            return "lost", exc.message
        if "session" in exc.message.lower():  # "Session not found", "Session terminated": HTTP 404
            return "expired", exc.message
        return "refused", f"{exc.message} (code {exc.code})"
    if isinstance(exc, _CONNECTION_ERRORS):
        return "lost", detail
    return "error", detail


def _leaf(exc: BaseException) -> BaseException:
    """The first error inside task-group ExceptionGroups that is not a cancellation."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or exc.exceptions)[0]
    return exc


@cache
def _client_info() -> mcp_types.Implementation:
    try:
        version = metadata.version("agentpool")
    except metadata.PackageNotFoundError:
        version = "0"
    return mcp_types.Implementation(name="agentpool", version=version)
