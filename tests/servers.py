"""Throwaway Redis and RabbitMQ servers for the tests that stop, restart or kill them.

Tests never touch services they do not own: the machine's Redis on 6379 and RabbitMQ on 5672 may
be a developer's own, with their data in them. A test that restarts a dependency starts its own
server here instead, on free loopback ports with its data in a temporary directory, and the
context manager always kills what it started (by pid) and removes that directory.

- :func:`redis_server` runs ``redis-server deploy/redis/redis.conf`` (the configuration agentpool
  ships: AOF, ``appendfsync everysec``) with ``stop()`` (graceful ``SHUTDOWN``), ``kill()``
  (SIGKILL) and ``start()`` again on the same port and data directory.
- :func:`rabbit_node` runs a RabbitMQ node ``ap-test-<pid>-<n>@localhost`` with no plugins,
  listening on 127.0.0.1 only, with ``stop_app()`` / ``start_app()`` through ``rabbitmqctl -n``;
  it shares the machine's epmd, and nothing else.

Without the server binaries these skip, or fail under CI (``CI`` set), like conftest's services.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
# Debian's /usr/sbin/rabbitmq* wrappers re-run the tools as the rabbitmq user (root) or refuse to
# run (anyone else); the scripts they wrap run as whoever calls them, which a test needs.
RABBIT_LIBEXEC = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 60.0
_nodes = itertools.count(1)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _missing(what: str) -> None:
    msg = f"{what} is not installed: the restart tests start throwaway servers of their own"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _wait(predicate: object, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``predicate`` (a callable) until true; fail early, with the log, if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited ({proc.returncode}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not up after {timeout_s}s:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _reap(proc: subprocess.Popen[bytes] | None, group: bool = False) -> None:
    """SIGKILL ``proc`` (and its process group when it leads one) unless it has exited."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the server we started, never by name
        elif proc.poll() is None:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# --- Redis


@dataclass
class RedisServer:
    """A ``redis-server`` on ``port`` with its AOF and RDB files in ``dir``."""

    port: int
    dir: Path
    conf: Path = SHIPPED_REDIS_CONF
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def client(self) -> redis.Redis:
        # No retries: redis-py's default backs off for seconds reconnecting after SHUTDOWN.
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def start(self) -> float:
        """Start (again) on the same port and data directory; -> seconds until it answers PING
        with its data loaded."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        t0 = time.monotonic()
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                str(self.conf),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the test run reaches it only through our teardown
        )
        self.starts += 1
        _wait(self._loaded, START_TIMEOUT_S, f"redis-server on {self.port}", self.proc, self.log_path)
        return time.monotonic() - t0

    def _loaded(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping()) and r.info("persistence")["loading"] == 0
        except redis.RedisError:  # refused while down; BusyLoadingError while it reads the AOF
            return False

    def stop(self) -> None:
        """Graceful ``SHUTDOWN``: Redis flushes and fsyncs its AOF (and saves an RDB) first."""
        assert self.proc is not None
        with self.client() as r:
            r.shutdown()
        self.proc.wait(30)

    def kill(self) -> None:
        """SIGKILL: what survives is what had reached the kernel (the AOF, every write)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        _reap(self.proc)
        if self._log is not None:
            self._log.close()


@contextlib.contextmanager
def redis_server(conf: Path = SHIPPED_REDIS_CONF) -> Iterator[RedisServer]:
    """A running throwaway Redis with ``conf``; killed and its directory removed afterwards."""
    if not shutil.which("redis-server"):
        _missing("redis-server")
    with tempfile.TemporaryDirectory(prefix="ap-redis-") as tmp:
        server = RedisServer(free_port(), Path(tmp), conf)
        try:
            server.start()
            yield server
        finally:
            server.close()


# --- RabbitMQ


def _rabbit_tool(name: str) -> str | None:
    direct = RABBIT_LIBEXEC / name
    if direct.is_file() and os.access(direct, os.X_OK):
        return str(direct)
    return shutil.which(name)


@dataclass
class RabbitNode:
    """A RabbitMQ node of its own: Mnesia, logs, config and Erlang cookie in ``base``."""

    name: str
    port: int
    dist_port: int
    base: Path
    server_bin: str
    ctl_bin: str
    proc: subprocess.Popen[bytes] | None = None
    started_in_s: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.base / "server.out"

    def env(self) -> dict[str, str]:
        b = self.base
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(b),  # the Erlang cookie: ours, in base, never the user's ~/.erlang.cookie
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            # Erlang distribution on loopback too; an epmd this node has to start listens there only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def prepare(self) -> None:
        b = self.base
        (b / "enabled_plugins").write_text("[].\n")  # no management plugin, no extra listener
        (b / "rabbitmq.conf").write_text(
            "# a throwaway node for the tests (tests/servers.py)\nloopback_users.guest = true\n"
        )
        (b / "rabbitmq-env.conf").write_text("")
        cookie = b / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)

    def ctl(self, *args: str, timeout_s: float = 90.0) -> str:
        res = subprocess.run(
            [self.ctl_bin, "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} on {self.name}: exit {res.returncode}\n"
                f"{res.stdout.decode(errors='replace')}{res.stderr.decode(errors='replace')}"
            )
        return res.stdout.decode(errors="replace")

    def start(self) -> float:
        t0 = time.monotonic()
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.server_bin],
            env=self.env(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the script, beam.smp and its helpers
        )
        _wait(lambda: _answers(self.port), START_TIMEOUT_S, f"RabbitMQ {self.name}", self.proc, self.log_path)
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT_S)))
        self.started_in_s = time.monotonic() - t0
        return self.started_in_s

    def stop_app(self) -> None:
        """Stop the broker application (connections drop, the port closes); the VM stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT_S)))

    def ensure_app(self) -> None:
        """Start the broker application if a test left it stopped."""
        if not _answers(self.port):
            self.start_app()

    def close(self) -> None:
        """Stop the node for good (``rabbitmqctl stop``), and SIGKILL its process group anyway."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout_s=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        _reap(self.proc, group=True)
        if self._log is not None:
            self._log.close()


@contextlib.contextmanager
def rabbit_node() -> Iterator[RabbitNode]:
    """A running throwaway RabbitMQ node; stopped, killed and its directory removed afterwards."""
    server, ctl = _rabbit_tool("rabbitmq-server"), _rabbit_tool("rabbitmqctl")
    if server is None or ctl is None:
        _missing("rabbitmq-server")
    assert server is not None and ctl is not None
    with tempfile.TemporaryDirectory(prefix="ap-rabbit-") as tmp:
        node = RabbitNode(
            f"ap-test-{os.getpid()}-{next(_nodes)}@localhost",
            free_port(),
            free_port(),
            Path(tmp),
            server,
            ctl,
        )
        node.prepare()
        try:
            node.start()
            yield node
        finally:
            node.close()
