"""Process settings from the environment, read once at start and validated loudly."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec

from agentpool.shared.config import EXAMPLE_CONFIG
from agentpool.shared.errors import ConfigError

_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


@dataclass(frozen=True, slots=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    config_path: str = str(EXAMPLE_CONFIG)
    # The pools config as JSON from a backend API (broker/config_source.py): fetched at start and
    # polled every config_poll_s; the file above is the fallback when neither it nor Redis has one.
    config_url: str | None = None
    config_headers: dict[str, str] = field(default_factory=dict, repr=False)  # e.g. Authorization
    config_poll_s: float = 10.0
    namespace: str = "ap"  # prefixes every Redis key and RabbitMQ queue/exchange name
    log_format: str = "json"  # json | text
    log_level: str = "INFO"
    routing: str = (
        "tiered"  # tiered (sticky/spill/overflow by depth) | hash (sticky order only, broker-bounded)
    )
    metrics: bool = True  # AGENTPOOL_METRICS=0 turns every metric hook into a no-op
    # required: every request needs a key | open: a key is optional (what `agentpool dev` runs with
    # unless AGENTPOOL_AUTH is set). A key that is sent is always checked. Nothing kept in Redis
    # decides this, so a Redis that lost its data can only refuse callers, never let them in.
    auth: str = "required"
    # When set, GET /metrics needs `Authorization: Bearer <token>` (Prometheus: authorization.credentials)
    metrics_token: str = ""
    # the gateway's HTTP bounds (gateway/guard.py): request line + headers, the URL within them, the
    # time a client has to send them, open connections per gateway process, idle keep-alive
    max_header_bytes: int = 16 * 1024
    max_url_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    keepalive_s: int = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        s = cls()
        s = replace(
            s,
            amqp_url=env.get("AGENTPOOL_AMQP_URL") or env.get("AMQP_URL") or s.amqp_url,
            redis_url=env.get("AGENTPOOL_REDIS_URL") or env.get("REDIS_URL") or s.redis_url,
            config_path=env.get("AGENTPOOL_CONFIG") or s.config_path,
            config_url=env.get("AGENTPOOL_CONFIG_URL", "").strip() or None,
            config_headers=_headers(env, "AGENTPOOL_CONFIG_HEADERS"),
            config_poll_s=_number(env, "AGENTPOOL_CONFIG_POLL_S", s.config_poll_s),
            namespace=env.get("AGENTPOOL_NAMESPACE") or s.namespace,
            log_format=env.get("AGENTPOOL_LOG_FORMAT") or s.log_format,
            log_level=(env.get("AGENTPOOL_LOG_LEVEL") or s.log_level).upper(),
            routing=env.get("AGENTPOOL_ROUTING") or s.routing,
            metrics=_flag(env, "AGENTPOOL_METRICS", s.metrics),
            auth=(env.get("AGENTPOOL_AUTH") or s.auth).lower(),
            metrics_token=env.get("AGENTPOOL_METRICS_TOKEN", s.metrics_token).strip(),
            max_header_bytes=_number(env, "AGENTPOOL_MAX_HEADER_BYTES", s.max_header_bytes),
            max_url_bytes=_number(env, "AGENTPOOL_MAX_URL_BYTES", s.max_url_bytes),
            header_timeout_s=_number(env, "AGENTPOOL_HEADER_TIMEOUT_S", s.header_timeout_s),
            max_connections=_number(env, "AGENTPOOL_MAX_CONNECTIONS", s.max_connections),
            keepalive_s=_number(env, "AGENTPOOL_KEEPALIVE_S", s.keepalive_s),
        )
        s.validate()
        return s

    def validate(self) -> None:
        _within("AGENTPOOL_MAX_HEADER_BYTES", self.max_header_bytes, 1024, 1 << 20)
        _within("AGENTPOOL_MAX_URL_BYTES", self.max_url_bytes, 256, self.max_header_bytes)
        _within("AGENTPOOL_HEADER_TIMEOUT_S", self.header_timeout_s, 0.1, 300)
        _within("AGENTPOOL_MAX_CONNECTIONS", self.max_connections, 1, 1_000_000)
        _within("AGENTPOOL_KEEPALIVE_S", self.keepalive_s, 1, 3600)
        if not 0 < self.config_poll_s <= 86400:
            raise ConfigError(
                f"AGENTPOOL_CONFIG_POLL_S: expected more than 0 and at most 86400, got {self.config_poll_s}"
            )
        if self.config_url is not None:
            url = urlsplit(self.config_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(
                    "AGENTPOOL_CONFIG_URL: expected an http:// or https:// URL, "
                    f"got {redact_url(self.config_url)!r}"
                )
        if urlsplit(self.amqp_url).scheme not in ("amqp", "amqps"):
            raise ConfigError(f"AGENTPOOL_AMQP_URL: expected amqp:// or amqps://, got {self.amqp_url!r}")
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"AGENTPOOL_REDIS_URL: expected redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if not _NAMESPACE.match(self.namespace):
            raise ConfigError(f"AGENTPOOL_NAMESPACE: expected 1-32 of [a-z0-9_-], got {self.namespace!r}")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"AGENTPOOL_LOG_FORMAT: expected json or text, got {self.log_format!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"AGENTPOOL_LOG_LEVEL: unknown level {self.log_level!r}")
        if self.routing not in ("tiered", "hash"):
            raise ConfigError(f"AGENTPOOL_ROUTING: expected tiered or hash, got {self.routing!r}")
        if self.auth == "auto":
            raise ConfigError(
                "AGENTPOOL_AUTH: 'auto' is gone (it opened the gateway whenever Redis had lost its keys); "
                "use required (the default) or open"
            )
        if self.auth not in ("required", "open"):
            raise ConfigError(f"AGENTPOOL_AUTH: expected required or open, got {self.auth!r}")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off; anything else fails at start."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw in ("1", "true", "yes", "on")
    raise ConfigError(f"{name}: expected 1 or 0, got {raw!r}")


_Num = TypeVar("_Num", int, float)


def _number(env: Mapping[str, str], name: str, default: _Num) -> _Num:
    """An int or float setting, of the default's type; text that is not one fails at start."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return type(default)(raw)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ConfigError(f"{name}: expected {kind}, got {raw!r}") from None


def _headers(env: Mapping[str, str], name: str) -> dict[str, str]:
    """A JSON object of HTTP header names to values; the value is never echoed (it holds secrets)."""
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    try:
        headers = msgspec.json.decode(raw, type=dict[str, str])
    except msgspec.DecodeError as e:  # ValidationError too: names the key, never the value
        raise ConfigError(
            f"{name}: expected a JSON object of header names to values, "
            f'e.g. {{"Authorization": "Bearer ..."}} ({e})'
        ) from None
    bad = [k for k, v in headers.items() if not _HEADER_NAME.match(k) or "\n" in v or "\r" in v]
    if bad:
        raise ConfigError(f"{name}: not a valid header name, or a value with a line break: {bad[0]!r}")
    return headers


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}: expected {low}-{high}, got {value}")


def redact_url(url: str) -> str:
    """``amqp://guest:***@host/`` — URLs are logged and printed, passwords never."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
