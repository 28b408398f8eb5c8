"""A fake LLM server speaking the OpenAI and Anthropic HTTP APIs, for tests and load tests.

Run it::

    agentpool fake-llm --port 9100 [--host 127.0.0.1] [--ttft-ms 300] [--tokens-per-s 40]
                       [--reply-tokens 24] [--api-key sk-fake]
    python -m agentpool.fake_llm --port 9100 ...

Defaults come from ``FAKE_LLM_TTFT_MS``, ``FAKE_LLM_TOKENS_PER_S``, ``FAKE_LLM_REPLY_TOKENS`` and
``FAKE_LLM_API_KEY``. Point providers at it (the OpenAI SDK wants ``/v1`` in its base URL, the
Anthropic SDK adds it itself)::

    [providers.openai-fake]
    kind = "openai"
    base_url = "http://127.0.0.1:9100/v1"
    api_key_env = "FAKE_LLM_API_KEY"

    [providers.anthropic-fake]
    kind = "anthropic"
    base_url = "http://127.0.0.1:9100"
    api_key_env = "FAKE_LLM_API_KEY"

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/messages`` (plain JSON, or SSE with
``"stream": true``), ``GET /v1/models``. The answers come from :mod:`agentpool.shared.fake_model` with
``n = min(max_tokens, reply_tokens)`` tokens; a text reply starts with ``[k earlier]``, k being the
number of messages before the last one, so a test sees history arrive.

Tools are offered and answered in each API's own format (:mod:`agentpool.fake_wire`). A marker
``@name {"json": "arguments"}`` in the latest user message makes the model call the offered tool
``name`` (several markers: several calls in one turn); given the results, it answers with their
content verbatim, or calls the next tool if a result holds a marker itself.

With ``--api-key``, OpenAI calls need ``Authorization: Bearer KEY`` and Anthropic calls
``x-api-key: KEY`` or ``Authorization: Bearer KEY`` (what the Anthropic SDK 2.x sends); anything
else gets a 401 in that API's error shape.

Per-request headers override the timing knobs: ``x-fake-ttft-ms``, ``x-fake-tokens-per-s``,
``x-fake-reply-tokens``. Faults come from the header ``x-fake-fault`` or from a script that the
model calls consume one each, first in first out, across both APIs (a call carrying the header
uses it and leaves the script alone)::

    curl -X POST localhost:9100/_fake/faults -d '{"faults": ["429", "500", "ok"], "retry_after_s": 0.1}'
    curl localhost:9100/_fake/stats    # requests per API, connections used, last bodies, ...
    curl -X POST localhost:9100/_fake/reset

Faults: ``429`` (with ``retry-after``), ``500``, ``timeout`` (no answer until the client gives
up), ``drop`` (a few tokens, then the connection is cut before the terminal events), ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agentpool.fake_wire import ANTHROPIC, OPENAI, Api, Call, Reject, Reply
from agentpool.shared.fake_model import input_tokens, respond

FAULTS = ("ok", "429", "500", "timeout", "drop")
BODIES_KEPT = 50  # last request bodies kept per API for /_fake/stats
DROP_LOG = "ASGI callable returned without completing response."  # uvicorn's words for a drop


@dataclass
class FakeLLMSettings:
    """Start-time knobs; ``hang_s`` bounds the ``timeout`` fault if the client never gives up."""

    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0 = as fast as possible
    reply_tokens: int = 24
    api_key: str | None = None
    retry_after_s: float = 1.0
    drop_after_tokens: int = 3
    hang_s: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FakeLLMSettings:
        """Defaults from ``FAKE_LLM_*`` variables; a bad number fails at start."""
        return cls(
            ttft_ms=float(environ.get("FAKE_LLM_TTFT_MS", 0)),
            tokens_per_s=float(environ.get("FAKE_LLM_TOKENS_PER_S", 0)),
            reply_tokens=int(environ.get("FAKE_LLM_REPLY_TOKENS", 24)),
            api_key=environ.get("FAKE_LLM_API_KEY") or None,
        )


class FakeLLM:
    """The server's state: settings, the fault script, and what it was asked."""

    def __init__(self, settings: FakeLLMSettings) -> None:
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        self.faults: deque[str] = deque()
        self.retry_after_s = self.settings.retry_after_s
        self.requests = {"openai": 0, "anthropic": 0}
        self.models_requests = 0
        self.hung_up_streams = 0  # streams the client closed before their end (a cancelled run)
        self.peers: set[tuple[str, int]] = set()  # client addresses: how many connections were used
        self.bodies: dict[str, deque[Any]] = {api: deque(maxlen=BODIES_KEPT) for api in self.requests}

    def script(self, faults: Sequence[str], retry_after_s: float | None) -> None:
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise Reject(400, f"unknown faults {bad}; known: {list(FAULTS)}")
        self.faults.extend(faults)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def seen(self, request: Request) -> None:
        if request.client is not None:
            self.peers.add((request.client.host, request.client.port))

    def record(self, api: str, body: Any) -> None:
        self.requests[api] += 1
        self.bodies[api].append(body)

    def take_fault(self, request: Request) -> str:
        """The header's fault if any (the script stays put), else the next scripted one."""
        fault = request.headers.get("x-fake-fault")
        if fault is None:
            return self.faults.popleft() if self.faults else "ok"
        if fault not in FAULTS:
            raise Reject(400, f"x-fake-fault: unknown fault {fault!r}; known: {list(FAULTS)}")
        return fault

    def hung_up(self) -> None:
        self.hung_up_streams += 1

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "models_requests": self.models_requests,
            "hung_up_streams": self.hung_up_streams,
            "connections": len(self.peers),
            "faults_pending": list(self.faults),
            "bodies": {api: list(b) for api, b in self.bodies.items()},
        }


def _knob(request: Request, name: str, default: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise Reject(400, f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise Reject(400, f"{name}: must be >= 0")
    return value


def plan_reply(settings: FakeLLMSettings, request: Request, call: Call, api: Api) -> Reply:
    """The deterministic reply to ``call``, with timing from the settings or request headers."""
    reply_tokens = int(_knob(request, "x-fake-reply-tokens", settings.reply_tokens)) or 1
    tokens_per_s = _knob(request, "x-fake-tokens-per-s", settings.tokens_per_s)
    answer = respond(
        call.system,
        call.messages,
        call.tool_names,
        reply_tokens,
        call.max_tokens,
        id_prefix=api.tool_id_prefix,
    )
    return Reply(
        id=f"{api.id_prefix}{uuid.uuid4().hex[:24]}",
        model=call.model,
        answer=answer,
        input_tokens=input_tokens(call.system, call.messages),
        ttft_s=_knob(request, "x-fake-ttft-ms", settings.ttft_ms) / 1000,
        gap_s=1.0 / tokens_per_s if tokens_per_s else 0.0,
    )


class _Pieces:
    """An ASGI response from body pieces; a ``None`` piece cuts the connection mid-body (a drop)."""

    def __init__(
        self,
        pieces: AsyncGenerator[bytes | None, None],
        headers: Mapping[str, str],
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.pieces = pieces
        self.headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        self.on_gone = on_gone  # called when the client hangs up before the body's end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        gone = asyncio.create_task(_until_disconnected(receive))
        try:
            async with contextlib.aclosing(self.pieces) as pieces:
                async for piece in pieces:
                    if gone.done() and self.on_gone is not None:
                        self.on_gone()
                    if piece is None or gone.done():
                        return  # the server closes the connection: the body never completes
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(
    api: Api, call: Call, reply: Reply, body: list[bytes], drop_after: int | None
) -> AsyncGenerator[bytes | None, None]:
    """The SSE body: head, the events (a text token or a tool call fragment each) at the configured
    pace, tail (or a cut)."""
    yield api.sse_head(call, reply)
    await asyncio.sleep(reply.ttft_s)
    for i, event in enumerate(body):
        if i == drop_after:
            yield None
            return
        if i and reply.gap_s:
            await asyncio.sleep(reply.gap_s)
        yield event
    yield api.sse_tail(call, reply)


async def _whole(body: bytes, delay_s: float, drop: bool) -> AsyncGenerator[bytes | None, None]:
    await asyncio.sleep(delay_s)
    yield body[: len(body) // 2] if drop else body
    if drop:
        yield None


def _respond(api: Api, call: Call, reply: Reply, fault: str, fake: FakeLLM) -> Response | _Pieces:
    settings = fake.settings
    drop = fault == "drop"
    if call.stream:
        events = api.sse_body(call, reply)
        drop_after = min(settings.drop_after_tokens, len(events) - 1) if drop else None
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        return _Pieces(_stream(api, call, reply, events, drop_after), headers, fake.hung_up)
    body = msgspec.json.encode(api.complete(call, reply))
    delay_s = reply.ttft_s + reply.gap_s * max(0, len(reply.tokens) - 1)
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    return _Pieces(_whole(body, delay_s, drop), headers)


async def _hang(request: Request, api: Api, hang_s: float) -> Response:
    """The ``timeout`` fault: no answer until the client hangs up (or ``hang_s`` passes)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(hang_s):
            await _until_disconnected(request.receive)
    return api.error(504, "fake timeout: the model did not answer in time")


async def _json(request: Request) -> Any:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as e:
        raise Reject(400, f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise Reject(400, "expected a JSON object")
    return body


def _check_auth(request: Request, api: Api, api_key: str | None) -> None:
    if api_key is not None and not api.authorized(request, api_key):
        raise Reject(401, "invalid api key")


async def _model_call(request: Request, api: Api) -> Response | _Pieces:
    """One chat call in ``api``'s format: record, authenticate, apply the fault, answer."""
    fake: FakeLLM = request.app.state.fake
    fake.seen(request)
    try:
        body = await _json(request)
        fake.record(api.name, body)
        _check_auth(request, api, fake.settings.api_key)
        call = api.parse(request, body)
        reply = plan_reply(fake.settings, request, call, api)
        fault = fake.take_fault(request)
    except Reject as e:
        return api.error(e.status, e.message)
    if fault == "429":
        retry = f"{fake.retry_after_s:g}"
        return api.error(429, "fake rate limit", {"retry-after": retry})
    if fault == "500":
        return api.error(500, "fake internal error")
    if fault == "timeout":
        return await _hang(request, api, fake.settings.hang_s)
    return _respond(api, call, reply, fault, fake)


async def openai_chat(request: Request) -> Response | _Pieces:
    return await _model_call(request, OPENAI)


async def anthropic_messages(request: Request) -> Response | _Pieces:
    return await _model_call(request, ANTHROPIC)


async def list_models(request: Request) -> Response:
    """``GET /v1/models`` in the format of whichever SDK asks (Anthropic's sends its version)."""
    fake: FakeLLM = request.app.state.fake
    fake.models_requests += 1
    fake.seen(request)
    api = ANTHROPIC if "anthropic-version" in request.headers else OPENAI
    try:
        _check_auth(request, api, fake.settings.api_key)
    except Reject as e:
        return api.error(e.status, e.message)
    return Response(msgspec.json.encode(api.models()), media_type="application/json")


async def post_faults(request: Request) -> Response:
    fake: FakeLLM = request.app.state.fake
    try:
        body = await _json(request)
        faults, retry_after_s = body.get("faults", []), body.get("retry_after_s")
        if not isinstance(faults, list) or not isinstance(retry_after_s, int | float | None):
            raise Reject(400, 'expected {"faults": [...], "retry_after_s": seconds}')
        fake.script([str(f) for f in faults], retry_after_s)
    except Reject as e:
        return Response(msgspec.json.encode({"error": e.message}), e.status, media_type="application/json")
    return _ok({"faults_pending": list(fake.faults)})


async def get_stats(request: Request) -> Response:
    return _ok(request.app.state.fake.stats())


async def post_reset(request: Request) -> Response:
    request.app.state.fake.reset()
    return _ok({"reset": True})


def _ok(data: Any) -> Response:
    return Response(msgspec.json.encode(data), media_type="application/json")


def build_app(fake: FakeLLM | None = None) -> Starlette:
    """The ASGI app; ``app.state.fake`` is its :class:`FakeLLM` (settings, fault script, stats)."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", openai_chat, methods=["POST"]),
            Route("/v1/messages", anthropic_messages, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/_fake/faults", post_faults, methods=["POST"]),
            Route("/_fake/stats", get_stats, methods=["GET"]),
            Route("/_fake/reset", post_reset, methods=["POST"]),
        ]
    )
    app.state.fake = fake or FakeLLM(FakeLLMSettings())
    return app


class _DropFilter(logging.Filter):
    """Drops uvicorn's error line for a cut connection: for this server that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != DROP_LOG


def _quiet_drops() -> None:
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropFilter) for f in log.filters):
        log.addFilter(_DropFilter())


def _uvicorn_config(app: Starlette, host: str, port: int, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        ws="none",
        access_log=False,
        timeout_graceful_shutdown=5,
        **kw,
    )


async def run(settings: FakeLLMSettings, host: str = "127.0.0.1", port: int = 9100) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles the signals)."""
    _quiet_drops()
    await uvicorn.Server(_uvicorn_config(build_app(FakeLLM(settings)), host, port)).serve()


def serve(host: str = "127.0.0.1", port: int = 9100, settings: FakeLLMSettings | None = None) -> None:
    """Blocking entry point: serve on ``host:port`` with uvicorn's event loop (uvloop if installed)."""
    _quiet_drops()
    app = build_app(FakeLLM(settings or FakeLLMSettings.from_env()))
    uvicorn.Server(_uvicorn_config(app, host, port)).run()


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server for in-process use: tells when it is listening, leaves signals alone."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Running:
    """A fake LLM serving in this event loop."""

    fake: FakeLLM
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running(
    settings: FakeLLMSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Running]:
    """Serve in the current event loop for the duration of the block; ``port=0`` picks a free one."""
    _quiet_drops()
    fake = FakeLLM(settings or FakeLLMSettings())
    sock = _bind(host, port)  # bound here so a taken port raises OSError instead of exiting
    server = _EmbeddedServer(_uvicorn_config(build_app(fake), host, port, log_config=None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if task.done():
            task.result()
            raise RuntimeError("the fake LLM server stopped during start-up")
        yield Running(fake, host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


def _parser() -> argparse.ArgumentParser:
    env = FakeLLMSettings.from_env()
    p = argparse.ArgumentParser(
        prog="agentpool fake-llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--ttft-ms", type=float, default=env.ttft_ms, help="delay before the first token")
    p.add_argument("--tokens-per-s", type=float, default=env.tokens_per_s, help="0 = as fast as possible")
    p.add_argument("--reply-tokens", type=int, default=env.reply_tokens, help="tokens per reply")
    p.add_argument("--api-key", default=env.api_key, help="require this key (default: accept any)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``agentpool fake-llm``: parse the flags and serve until interrupted."""
    try:
        args = _parser().parse_args(argv)
    except ValueError as e:  # a bad FAKE_LLM_* number
        print(f"fake-llm: {e}", file=sys.stderr)
        return 2
    settings = FakeLLMSettings(
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        reply_tokens=args.reply_tokens,
        api_key=args.api_key or None,
    )
    serve(args.host, args.port, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
