"""Where a process's pools config comes from, and how a new one reaches it while it runs.

With ``AGENTPOOL_CONFIG_URL`` set, a backend API serves the pools config as JSON in the pools
file's schema (``AGENTPOOL_CONFIG_HEADERS`` for its auth). A process fetches it at start; if the
API does not answer with a valid document, it starts from the last good one kept in Redis
(``config:last_good``, written by whichever process fetched it), else from the pools file. While
running it polls every ``AGENTPOOL_CONFIG_POLL_S`` with ``If-None-Match`` (304: unchanged). A valid
document with other content goes to the process's apply callback (the gateway's client, the
supervisor); a fetch that fails or a document that is invalid leaves the config in force, and is
recorded: :meth:`ConfigSource.status` (``GET /v1/config``) and ``agentpool_config_errors``.
Without a URL the pools file is the source. ``agentpool reload`` (a message on the namespace's
``config:reload`` channel) and SIGHUP make a process poll now, or re-read its file, the same way.

A config's version is a short hash of its validated content, so the same pools from the API, from
Redis or from a file are one version; the API's ETag is reported beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aredis

from agentpool.broker import tenants
from agentpool.broker.redis_conn import REDIS_ERRORS, connect
from agentpool.shared import metrics
from agentpool.shared.config import EXAMPLE_CONFIG, Config, load_config, parse_config_json
from agentpool.shared.errors import ConfigError
from agentpool.shared.names import Names
from agentpool.shared.settings import Settings, redact_url
from agentpool.shared.tasks import cancel_and_wait

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("agentpool.config")

FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
LISTEN_RETRY_S = 1.0
Source = Literal["api", "redis", "file"]
Apply = Callable[[Config], Awaitable[None]]

_ENCODER = msgspec.json.Encoder(order="deterministic")
# KEYS: last good; ARGV: fetched at, doc, version, etag, url. An older fetch never overwrites a newer.
_STORE = """
local at = redis.call('HGET', KEYS[1], 'at')
if at and tonumber(at) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'at', ARGV[1], 'doc', ARGV[2], 'version', ARGV[3],
           'etag', ARGV[4], 'url', ARGV[5])
return 1
"""


def config_version(config: Config) -> str:
    """A short hash of the validated config: equal content, equal version, whatever the source."""
    return hashlib.sha256(_ENCODER.encode(config)).hexdigest()[:12]


def deployment_fingerprint(config: Config, pool: str, deployment: str) -> str | None:
    """What a replica of the deployment is built from: its agent type and that type's provider, the
    pool's limits (prefetch, queue bounds) and validator. None if the config has no such deployment."""
    p = tenants.pool_config(config, pool)
    dep = next((d for d in p.deployments if d.name == deployment), None) if p is not None else None
    if p is None or dep is None:
        return None
    agent_type = config.agent_types[dep.agent_type]
    parts = (dep.agent_type, agent_type, config.providers[agent_type.provider], p.limits, p.validator)
    return hashlib.sha256(_ENCODER.encode(parts)).hexdigest()[:12]


class ConfigStatus(msgspec.Struct, kw_only=True):
    """The config a process runs, where it came from, and the last refusal (``GET /v1/config``)."""

    source: Source  # api: fetched from the URL; redis: the last good one (API down at start); file
    version: str
    url: str | None  # AGENTPOOL_CONFIG_URL without password or query
    path: str  # the pools file (the source without a URL; the last fallback with one)
    etag: str | None  # the API's ETag of the config in force
    loaded_at: float  # when this process took it (unix s)
    last_error: str | None = None  # why the API's latest answer, or the file, was refused; None once fine
    last_error_at: float | None = None
    polls: int = 0
    errors: int = 0  # refusals so far (unreachable, not 200, invalid)


@dataclass(frozen=True, slots=True)
class _Loaded:
    config: Config
    source: Source
    version: str
    etag: str | None
    at: float


class ConfigSource:
    """One process's pools config: :meth:`initial` at start, then :meth:`running` applies changes."""

    def __init__(self, settings: Settings, config: Config | None = None) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.key = last_good_key(self.names)
        self._loaded: _Loaded | None = None
        if config is not None:
            self._take(config, "file", None)
        self._apply: Apply | None = None
        self._redis: aredis.Redis | None = None
        self._http: httpx.AsyncClient | None = None
        self._lock: asyncio.Lock | None = None
        self._seen_etag: str | None = None  # of the API's last document, valid or not (If-None-Match)
        self._seen_error: str | None = None  # why that document was refused
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._polls = 0
        self._errors = 0

    @property
    def ready(self) -> bool:
        """Has it a config (given, or from :meth:`initial`)?"""
        return self._loaded is not None

    def fork(self) -> ConfigSource:
        """Another consumer of the same start (``agentpool dev``: the gateway and the supervisor
        each apply changes themselves)."""
        other = ConfigSource(self.settings)
        other._loaded, other._seen_etag, other._seen_error = self._loaded, self._seen_etag, self._seen_error
        other._last_error, other._last_error_at = self._last_error, self._last_error_at
        return other

    @property
    def config(self) -> Config:
        if self._loaded is None:
            raise RuntimeError("no config yet: call initial() first")
        return self._loaded.config

    @property
    def url(self) -> str | None:
        """The URL as shown (status, logs, error messages): no password, no query."""
        url = self.settings.config_url
        return redact_url(urlsplit(url)._replace(query="", fragment="").geturl()) if url else None

    def status(self) -> ConfigStatus:
        cur = self._loaded
        if cur is None:
            raise RuntimeError("no config yet: call initial() first")
        return ConfigStatus(
            source=cur.source,
            version=cur.version,
            url=self.url,
            path=self.settings.config_path,
            etag=cur.etag,
            loaded_at=cur.at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            polls=self._polls,
            errors=self._errors,
        )

    # --- start
    def load_file(self) -> Config:
        """The pools file as the config (no URL); a bad file raises :class:`ConfigError`."""
        config = load_config(self.settings.config_path)
        self._take(config, "file", None)
        return config

    async def initial(self) -> Config:
        """The config to start from: the URL's, else the last good one in Redis, else the file."""
        if self._loaded is not None:
            return self._loaded.config
        if self.settings.config_url is None:
            return self.load_file()
        redis = self._redis or connect(self.settings.redis_url)
        try:
            try:
                got = await self._get(None)
                assert got is not None  # no If-None-Match, so never a 304
                body, self._seen_etag = got
                config = parse_config_json(body, cast(str, self.url))
            except ConfigError as e:
                self._seen_error = e.message if self._seen_etag else None  # an invalid document's
                self._refuse(e.message)
            else:
                self._take(config, "api", self._seen_etag)
                await self._store(redis, config, self._seen_etag)
                return config
            stored = await self._last_good(redis)
            if stored is not None:
                config, etag = stored
                self._take(config, "redis", etag)
                log.warning(
                    "config API refused (%s); starting from the last good config in Redis", self._last_error
                )
                return config
            return self._fallback()
        finally:
            if self._redis is None:
                await redis.aclose()

    def _fallback(self) -> Config:
        why = f"{self._last_error}; no last good config in Redis"
        if self.settings.config_path == str(EXAMPLE_CONFIG):  # not a fallback anyone chose
            raise ConfigError(f"{why}, and no pools file to fall back on (set AGENTPOOL_CONFIG)")
        try:
            config = self.load_file()
        except ConfigError as e:
            raise ConfigError(f"{why}; {e.message}") from None
        log.warning("config API refused (%s); starting from the pools file", self._last_error)
        return config

    # --- running
    @contextlib.asynccontextmanager
    async def running(self, redis: aredis.Redis, apply: Apply) -> AsyncIterator[ConfigSource]:
        """Until the block ends, hand every new valid config to ``apply``: polled from the URL, or
        re-read when someone runs ``agentpool reload``. ``apply`` raising leaves the old config in
        force (the next poll tries again)."""
        import httpx

        if self._loaded is None:
            raise RuntimeError("no config yet: call initial() first")
        self._redis, self._apply, self._lock = redis, apply, asyncio.Lock()
        tasks = [asyncio.create_task(self._listen(), name="config-reload")]
        if self.settings.config_url is not None:
            self._http = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S)
            tasks.append(asyncio.create_task(self._poll_loop(), name="config-poll"))
        try:
            yield self
        finally:
            await cancel_and_wait(tasks)
            if self._http is not None:
                await self._http.aclose()
            self._http = None
            self._redis, self._apply, self._lock = None, None, None

    async def reload(self) -> ConfigStatus:
        """Poll the URL now, or re-read the pools file without one; an invalid config is refused
        (see ``last_error``) and the one in force stays."""
        if self.settings.config_url is not None:
            await self.poll()
            return self.status()
        async with self._locked():
            try:
                config = load_config(self.settings.config_path)
            except ConfigError as e:
                self._refuse(e.message)
            else:
                self._last_error = None
                await self._offer(config, "file", None)
        return self.status()

    async def poll(self) -> bool:
        """One GET of the URL: True if it brought a new config that was applied."""
        async with self._locked():
            self._polls += 1
            try:
                got = await self._get(self._seen_etag)
            except ConfigError as e:
                self._refuse(e.message)
                return False
            if got is None:  # 304: the document seen last, refused or not
                self._last_error = self._seen_error or None
                return False
            body, self._seen_etag = got
            try:
                config = parse_config_json(body, cast(str, self.url))
            except ConfigError as e:
                self._seen_error = e.message
                self._refuse(e.message)
                return False
            self._seen_error = self._last_error = None
            if self._redis is not None:
                await self._store(self._redis, config, self._seen_etag)
            return await self._offer(config, "api", self._seen_etag)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.config_poll_s)
            try:
                await self.poll()
            except Exception:  # never let a surprise end the polling
                log.exception("config poll failed")

    async def _listen(self) -> None:
        """``agentpool reload``: a message on the ``config:reload`` channel."""
        assert self._redis is not None
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(reload_channel(self.names))
                while True:
                    if await pubsub.get_message(timeout=5.0) is not None:
                        await self._reload_asked()
            except REDIS_ERRORS as e:
                log.warning("config reload channel lost (%s); reloads wait for it", e)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(LISTEN_RETRY_S)

    async def _reload_asked(self) -> None:
        try:
            status = await self.reload()
        except Exception:  # the listener goes on
            log.exception("reload failed")
            return
        log.info("reload asked: config %s from %s", status.version, status.source)

    # --- taking a config
    async def _offer(self, config: Config, source: Source, etag: str | None) -> bool:
        """Apply ``config`` if its version differs from the one in force; True if it did."""
        version = config_version(config)
        cur = self._loaded
        if cur is not None and cur.version == version:
            if (cur.source, cur.etag) != (source, etag):  # the same content, from elsewhere now
                self._take(config, source, etag, version, at=cur.at)
            return False
        if self._apply is not None:
            try:
                await self._apply(config)
            except Exception as e:
                log.exception("applying config %s failed; the one in force stays", version)
                self._seen_etag = None  # fetch it whole next time, and try again
                self._refuse(f"applying config {version} failed: {type(e).__name__}: {e}")
                return False
        was = cur.version if cur is not None else "none"
        self._take(config, source, etag, version)
        log.info("config %s from %s in force (was %s)", version, source, was)
        return True

    def _take(
        self, config: Config, source: Source, etag: str | None, version: str = "", at: float = 0.0
    ) -> None:
        loaded = _Loaded(config, source, version or config_version(config), etag, at or time.time())
        self._loaded = loaded
        metrics.config_loaded(loaded.source, loaded.version, loaded.at)

    def _refuse(self, why: str) -> None:
        again = why == self._last_error  # an API down for an hour: one warning, not one per poll
        self._last_error, self._last_error_at = why, time.time()
        self._errors += 1
        metrics.config_error()
        log.log(
            logging.DEBUG if again else logging.WARNING, "config refused, the one in force stays: %s", why
        )

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        if self._lock is None:  # not running: nothing else can be polling
            yield
            return
        async with self._lock:
            yield

    # --- the API and Redis
    async def _get(self, etag: str | None) -> tuple[bytes, str | None] | None:
        """The URL's document and ETag; None for 304. Raises :class:`ConfigError` saying why not."""
        import httpx

        url, shown = cast(str, self.settings.config_url), cast(str, self.url)
        headers = {"Accept": "application/json", **self.settings.config_headers}
        if etag is not None:
            headers["If-None-Match"] = etag
        own = self._http is None
        http = self._http or httpx.AsyncClient(timeout=FETCH_TIMEOUT_S)
        try:
            async with http.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 304 and etag is not None:
                    return None
                if resp.status_code != 200:
                    raise ConfigError(
                        f"{shown}: HTTP {resp.status_code} (expected 200 and the config as JSON)"
                    )
                body = bytearray()
                async for part in resp.aiter_bytes():
                    body += part
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise ConfigError(f"{shown}: the document is over {MAX_DOCUMENT_BYTES} bytes")
                return bytes(body), resp.headers.get("etag")
        except httpx.HTTPError as e:
            raise ConfigError(f"{shown}: {type(e).__name__}: {str(e) or 'no answer'}") from None
        finally:
            if own:
                await http.aclose()

    async def _store(self, redis: aredis.Redis, config: Config, etag: str | None) -> None:
        """Keep a valid config fetched from the API as the last good one, for processes that start
        while the API is down."""
        args: list[float | bytes | str] = [
            time.time(),
            _ENCODER.encode(config),
            config_version(config),
            etag or "",
            self.url or "",
        ]
        try:
            await redis.eval(_STORE, 1, self.key, *args)
        except REDIS_ERRORS as e:
            log.warning("could not keep the config in Redis as the last good one: %s", e)

    async def _last_good(self, redis: aredis.Redis) -> tuple[Config, str | None] | None:
        try:
            raw = cast(dict[bytes, bytes], await redis.hgetall(self.key))
        except REDIS_ERRORS as e:
            log.warning("could not read the last good config from Redis: %s", e)
            return None
        if b"doc" not in raw:
            return None
        try:
            config = parse_config_json(raw[b"doc"], "the last good config in Redis")
        except ConfigError as e:  # kept by another version of agentpool, say
            log.warning("%s", e.message)
            return None
        return config, raw.get(b"etag", b"").decode() or None


def last_good_key(names: Names) -> str:
    """Hash: the last good document fetched from the API (doc, version, etag, url, at)."""
    return f"{names.ns}:config:last_good"


def reload_channel(names: Names) -> str:
    """Channel every running :class:`ConfigSource` listens on (``agentpool reload``)."""
    return f"{names.ns}:config:reload"


async def last_good(redis: aredis.Redis, names: Names) -> dict[str, str]:
    """What Redis keeps as the last good config (version, etag, url, at), without the document."""
    raw = cast(dict[bytes, bytes], await redis.hgetall(last_good_key(names)))
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"doc"}


async def request_reload(redis: aredis.Redis, names: Names) -> int:
    """Ask every gateway and supervisor of the namespace to re-read its config; how many heard it."""
    return int(await redis.publish(reload_channel(names), "reload"))


def reload_on_sighup(*sources: ConfigSource) -> Callable[[], None]:
    """SIGHUP reloads ``sources`` (for the runners: they own the signals); returns the undo."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[ConfigStatus]] = set()

    def on_hup() -> None:
        log.info("SIGHUP: reloading the config")
        for source in sources:
            task = loop.create_task(source.reload())
            running.add(task)
            task.add_done_callback(running.discard)

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return undo


def status_line(s: ConfigStatus, stored: dict[str, str], now: float) -> str:
    """``agentpool status``'s config line."""
    where = s.url if s.source == "api" else ("Redis (the last good one)" if s.source == "redis" else s.path)
    line = f"config: version {s.version} from {where}"
    if s.etag:
        line += f" (ETag {s.etag})"
    if stored:
        line += f"; last good in Redis: version {stored.get('version')}"
        if stored.get("at"):
            line += f", fetched {max(0.0, now - float(stored['at'])):.0f}s ago"
    if s.last_error:
        line += f"\nconfig refused: {s.last_error}"
    return line
