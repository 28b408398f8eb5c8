"""Bounds on the gateway's HTTP/1.1 surface, kept in uvicorn's httptools protocol.

Left alone, uvicorn takes a request head of any size (httptools buffers a header until its end),
waits as long as a client likes for one, and keeps every connection it is offered. ``Guard``
answers first, each time with the usual error JSON and ``Connection: close``:

    request line + headers over max_header_bytes    431 HEADERS_TOO_LARGE (the rest is not parsed)
    URL over max_url_bytes                          414 URI_TOO_LONG
    head unfinished header_timeout_s after the connection opened or its first byte arrived
                                                    408 REQUEST_TIMEOUT, or closed if nothing came
    max_connections already open in this process    503 TOO_MANY_CONNECTIONS + Retry-After

Over the connection cap the answer is a 503, not a bare close: a client or load balancer sees a
retryable, explained refusal instead of a reset that looks like a crash. After any answer the
connection drains what the client still sends for up to LINGER_S, so the answer is read rather
than lost to a TCP reset, then closes; a refused connection does not count against the cap.

The cost per request is a few integer operations in ``data_received`` and the parser callbacks;
responses are not touched. A head that begins inside a read (a request pipelined behind another,
a chunked body's trailers) starts its count at the next read, so it may pass the cap by at most
the rest of that read (<= 256 KiB).

The caps on the headers the gateway reads or keeps are in ``HEADER_CAPS``; each is checked where
its header is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from agentpool.gateway import auth, idempotency
from agentpool.gateway.http import TRACEPARENT_CHARS, error_headers
from agentpool.shared.errors import AgentPoolError, BadRequest, Unavailable
from agentpool.shared.settings import Settings

log = logging.getLogger("agentpool.gateway")

LINGER_S = 2.0
WARN_EVERY_S = 10.0  # "connection cap reached" at most this often: a flood must not flood the log

#: Every request header the gateway reads into state or a message: the most characters it takes
#: and what a longer value gets. Others (Accept, Content-Type, anthropic-version) are only looked
#: at, never kept, and max_header_bytes bounds them.
HEADER_CAPS: dict[str, tuple[int, str]] = {
    "Idempotency-Key": (idempotency.MAX_KEY_CHARS, "400"),  # gateway/idempotency.py
    "X-Thread-ID": (128, "400"),  # broker/client.py THREAD_ID
    "Last-Event-ID": (41, "400"),  # gateway/http.py resume_after: two 20-digit parts
    "X-API-Key": (auth.MAX_KEY_CHARS, "401"),  # gateway/auth.py; also the key of Authorization: Bearer
    "traceparent": (TRACEPARENT_CHARS, "dropped"),  # gateway/http.py traceparent: W3C says ignore it
}


class _UrlTooLong(Exception):
    """Raised in a parser callback to stop the parser; told apart from a malformed request."""


class Guard(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds above; ``guarded(settings)`` sets them.

    Hot path: ``data_received`` checks one flag and one budget; parser callbacks set them."""

    max_head: ClassVar[int]
    max_url: ClassVar[int]
    head_timeout_s: ClassVar[float]
    max_connections: ClassVar[int]
    answers: ClassVar[dict[int, bytes]]  # status -> the response after its status line
    on_shutdown: ClassVar[tuple[Callable[[], None], ...]] = ()  # run when the server begins to stop
    _warned_at: ClassVar[float] = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # from the connection's start or a request's end to the next head's end
        self._head_left = self.max_head  # bytes the current head may still take; -1 once refused
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self.transport = transport
            self._warn_full()
            self._refuse(503)
            return
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def shutdown(self) -> None:
        """uvicorn stops: endless streams (the dashboard's) end now instead of at its grace timeout."""
        for hook in self.on_shutdown:
            hook()
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes | memoryview) -> None:
        if self._in_head:
            if len(data) > self._head_left:
                self._head_overflows(data)
                return
            self._head_left -= len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, _UrlTooLong):
                self._refuse(414)
                return
            msg = "Invalid HTTP request received."  # from here on, uvicorn's own data_received
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        # A head began and is not complete (a whole one in one read never gets here): time it.
        if (
            self._in_head
            and self._head_left < self.max_head
            and self._head_timer is None
            and not self._refused
        ):
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._cancel_head_timer()
        if len(self.url) > self.max_url:
            raise _UrlTooLong
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._in_head, self._head_left = True, self.max_head
        if self._head_timer is not None:  # armed in a chunked body's trailers
            self._cancel_head_timer()

    def on_chunk_header(self) -> None:
        """A chunk of a chunked body: its data or, after the last one, trailers, which httptools
        buffers like headers. They count as a head until data comes."""
        self._in_head, self._head_left = True, self.max_head

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        HttpToolsProtocol.on_body(self, body)

    def _head_overflows(self, data: bytes | memoryview) -> None:
        """``data`` holds more than the head may still take: parse what fits; a head that does
        not end within it is a 431, and what follows it is parsed as usual."""
        if self._refused:
            return  # draining after an answer
        fits, view = self._head_left, memoryview(data)  # httptools parses a view in place
        if fits:
            self.data_received(view[:fits])  # takes the budget to 0
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(431)
        else:
            self.data_received(view[fits:])

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined behind a reply
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        elif self._head_left == self.max_head:  # not a byte of a request: close as keep-alive does
            self.transport.close()
        else:
            self._refuse(408)

    def _refuse(self, status: int) -> None:
        """Answer ``status`` and stop parsing; drain what still comes for up to LINGER_S, then close."""
        log.debug("refused a request: %d", status, extra={"client": self.client})
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self._refused, self._in_head, self._head_left = True, True, -1  # every read: _head_overflows
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # trailers, or a request pipelined behind a reply: no room to answer
            return
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:  # date, as on uvicorn's answers
            head += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*head, self.answers[status]]))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.close)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _warn_full(self) -> None:
        now = self.loop.time()
        if now - Guard._warned_at >= WARN_EVERY_S:
            Guard._warned_at = now
            log.warning(
                "connection cap reached: refusing new connections with 503",
                extra={"max_connections": self.max_connections},
            )


def guarded(settings: Settings, hook: Callable[[], None] | None = None) -> type[Guard]:
    """``Guard`` with ``settings``' bounds, for ``uvicorn.Config(http=...)``; ``hook`` runs when the
    server begins to stop."""

    class Bounded(Guard):
        max_head = settings.max_header_bytes
        max_url = settings.max_url_bytes
        head_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections
        answers = _answers(settings)
        on_shutdown = (hook,) if hook is not None else ()

    return Bounded


def _answers(s: Settings) -> dict[int, bytes]:
    head, url, wait = s.max_header_bytes, s.max_url_bytes, s.header_timeout_s
    full = Unavailable(
        f"the gateway holds its limit of {s.max_connections} connections",
        error_code="TOO_MANY_CONNECTIONS",
        retry_after_s=1,
    )
    return {
        431: _answer(431, "HEADERS_TOO_LARGE", f"request line and headers over {head} bytes", head),
        414: _answer(414, "URI_TOO_LONG", f"URL over {url} bytes", url),
        408: _answer(408, "REQUEST_TIMEOUT", f"request line and headers not sent within {wait:g} s"),
        503: _raw(full),
    }


def _answer(status: int, code: str, message: str, limit_bytes: int | None = None) -> bytes:
    err = BadRequest(
        message, error_code=code, details={} if limit_bytes is None else {"limit_bytes": limit_bytes}
    )
    err.status = status
    return _raw(err)


def _raw(err: AgentPoolError) -> bytes:
    """``err`` as an HTTP/1.1 response that closes the connection, but for its status line."""
    body = msgspec.json.encode(err.body())
    head = [b"content-type: application/json\r\n"]
    head += [f"{k.lower()}: {v}\r\n".encode() for k, v in error_headers(err).items()]
    head += [b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
    return b"".join([*head, body])
