"""The ``agentpool`` command. Each subcommand imports only the packages it needs.

Exit codes: 0 ok, 2 bad usage or configuration, 3 a dependency (RabbitMQ/Redis) is unreachable,
4 a port to listen on is in use, 5 ``agentpool wait`` timed out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agentpool import keys_cmd

if TYPE_CHECKING:
    from agentpool.broker.config_source import ConfigSource
    from agentpool.shared.config import Config
    from agentpool.shared.settings import Settings

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_PORT_IN_USE = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130
_REQUIRED: Any = object()  # a worker option with no default (``--replica auto`` is None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentpool", description="Pools of warm LLM agents.")
    p.add_argument("--config", help="pools file (default: $AGENTPOOL_CONFIG or the shipped example)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="run workers for every deployment and the gateway, on this machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument(
        "--port", type=int, default=_env_port("AGENTPOOL_PORT", 8080), help="default $AGENTPOOL_PORT or 8080"
    )
    dev.add_argument(
        "--metrics-port",
        type=int,
        default=_env_port("AGENTPOOL_METRICS_PORT", 9464),
        help="the workers' /metrics, summed (default $AGENTPOOL_METRICS_PORT or 9464; 0 = any free port)",
    )

    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument(
        "--host",
        default=os.environ.get("AGENTPOOL_HOST") or "127.0.0.1",
        help="default $AGENTPOOL_HOST or 127.0.0.1 (containers pass 0.0.0.0)",
    )
    gw.add_argument(
        "--port", type=int, default=_env_port("AGENTPOOL_PORT", 8080), help="default $AGENTPOOL_PORT or 8080"
    )

    w = sub.add_parser("worker", help="run one warm replica")
    w.add_argument("--pool")
    w.add_argument("--deployment")
    w.add_argument(
        "--replica",
        type=_replica_arg,
        default=_REQUIRED,
        help="replica number from 1, or auto: the lowest free slot, through a Redis lease",
    )
    w.add_argument(
        "--standby",
        action="store_true",
        help="import everything, then wait for 'pool<TAB>deployment<TAB>n' on stdin (the supervisor's spare)",
    )
    w.add_argument("--drain-timeout-s", type=float, default=30.0)
    w.add_argument("--metrics-port", type=int, help="serve this replica's /metrics (outside a supervisor)")
    w.add_argument("--metrics-host", default=_METRICS_HOST, help=_METRICS_HOST_HELP)

    ws = sub.add_parser("workers", help="run the supervisor: keep deployments at their desired replicas")
    ws.add_argument("--pool", action="append", help="only these pools (repeatable)")
    ws.add_argument(
        "--metrics-port",
        type=int,
        default=_env_port("AGENTPOOL_METRICS_PORT", 9464),
        help="one /metrics summing every worker (default $AGENTPOOL_METRICS_PORT or 9464; 0 = any free port)",
    )
    ws.add_argument("--metrics-host", default=_METRICS_HOST, help=_METRICS_HOST_HELP)
    ws.add_argument(
        "--no-standby",
        dest="standby",
        action="store_false",
        help="keep no spare worker process with its imports done (saves its memory; starts are slower)",
    )

    f = sub.add_parser("fake-llm", help="run the fake LLM server (OpenAI + Anthropic wire formats)")
    f.add_argument("args", nargs=argparse.REMAINDER, help="see `agentpool fake-llm --help`")

    sc = sub.add_parser("scale", help="set a deployment's desired replicas")
    sc.add_argument("pool")
    sc.add_argument("deployment")
    sc.add_argument("replicas", type=int)

    st = sub.add_parser("status", help="pools: desired vs ready replicas and health; or one pool's replicas")
    st.add_argument("pool", nargs="?")

    wt = sub.add_parser("wait", help="wait until pools have their desired replicas ready (exit 5 on timeout)")
    wt.add_argument("pool", nargs="*", help="these pools (default: every pool that wants replicas now)")
    wt.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")

    sub.add_parser(
        "check", help="probe RabbitMQ and Redis and the pools file (or config API); exit 0 if all are fine"
    )
    sub.add_parser(
        "reload",
        help="check the config, then have every gateway and supervisor re-read theirs now "
        "(the pools file, or a poll of AGENTPOOL_CONFIG_URL)",
    )
    keys_cmd.add_parser(sub)
    return p


_METRICS_HOST = os.environ.get("AGENTPOOL_METRICS_HOST") or "127.0.0.1"
_METRICS_HOST_HELP = (
    "where /metrics listens (default $AGENTPOOL_METRICS_HOST or 127.0.0.1; containers pass 0.0.0.0)"
)


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        print(f"agentpool: {name}: expected a port number, got {raw!r}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return int(raw)


def _replica_arg(value: str) -> int | None:
    """``auto`` -> None (claim a free slot), else a replica number >= 1."""
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("expected a number >= 1 or 'auto'")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-llm"]:
        # Its own parser takes every option (argparse.REMAINDER drops a leading --port).
        from agentpool import fake_llm

        return int(fake_llm.main(argv[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "worker" and not args.standby:
        missing = [f"--{a}" for a in ("pool", "deployment") if getattr(args, a) is None]
        missing += ["--replica"] if args.replica is _REQUIRED else []
        if missing:
            parser.error(f"worker needs {', '.join(missing)} (or --standby)")
    if args.command == "fake-llm":  # after global options: ``agentpool --config F fake-llm ...``
        from agentpool import fake_llm

        return int(fake_llm.main(args.args) or 0)

    from dataclasses import replace

    from agentpool.shared import metrics
    from agentpool.shared.errors import AgentPoolError, ConfigError, Unavailable
    from agentpool.shared.logs import setup_logging
    from agentpool.shared.settings import Settings

    try:
        settings = Settings.from_env()
        if args.config:
            settings = replace(settings, config_path=args.config)
        if args.command == "dev" and not os.environ.get("AGENTPOOL_AUTH"):
            settings = replace(settings, auth="open")  # dev serves callers without a key, says so
        setup_logging("text" if args.command == "dev" else settings.log_format, settings.log_level)
        metrics.configure(settings.metrics)
        source = _config_source(settings)  # the config API's, Redis's last good one, or the file
        config = source.config
    except ConfigError as e:
        print(f"agentpool: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    commands: dict[str, Callable[[], int]] = {
        "dev": lambda: _dev(settings, source, args.host, args.port, args.metrics_port),
        "gateway": lambda: _gateway(settings, source, args.host, args.port),
        "worker": lambda: _worker(settings, config, args),
        "workers": lambda: _workers(
            settings, source, args.pool, args.metrics_port, args.standby, args.metrics_host
        ),
        "scale": lambda: _scale(settings, config, args.pool, args.deployment, args.replicas),
        "check": lambda: _check(settings, source),
        "reload": lambda: _reload(settings, source),
        "status": lambda: _status(settings, source, args.pool),
        "wait": lambda: _wait(settings, config, args.pool, args.timeout),
        "keys": lambda: keys_cmd.run(settings, config, args),
    }
    try:
        return commands[args.command]()
    except BrokenPipeError:  # `agentpool status | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit is quiet
        return EXIT_OK
    except ConfigError as e:
        print(f"agentpool: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    except Unavailable as e:
        print(f"agentpool: {e.message}" + (f" at {e.internal}" if e.internal else ""), file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AgentPoolError as e:  # e.g. `agentpool status nosuch`: the API's answer, as one line
        print(f"agentpool: {e.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _config_source(settings: Settings) -> ConfigSource:
    """The config to start from (broker/config_source.py): the pools file, or with a config URL its
    document, else the last good one Redis keeps, else the file."""
    from agentpool.broker.config_source import ConfigSource

    source = ConfigSource(settings)
    if settings.config_url is None:
        source.load_file()
    else:
        asyncio.run(source.initial())
    return source


def _how_to_start(service: str) -> str:
    binary = {"RabbitMQ": "rabbitmq-server", "Redis": "redis-server"}[service]
    local = {
        "RabbitMQ": "rabbitmq-server -detached",
        "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
    }
    hint = f"start it with `docker compose up -d {service.lower()}`"
    if shutil.which(binary):
        hint += f", or with the local server: `{local[service]}`"
    return hint


async def _probe(settings: Settings) -> list[str]:
    """Which dependencies are unreachable, each with its URL and how to get it."""
    import aio_pika

    from agentpool.broker.redis_conn import connect
    from agentpool.shared.settings import Settings, redact_url

    assert isinstance(settings, Settings)
    problems = []
    try:
        async with asyncio.timeout(5):
            conn = await aio_pika.connect(settings.amqp_url)
        await conn.close()
    except Exception as e:
        problems.append(
            f"RabbitMQ is not reachable at {redact_url(settings.amqp_url)} ({type(e).__name__}: {e}); "
            + _how_to_start("RabbitMQ")
        )
    r = connect(settings.redis_url)
    try:
        async with asyncio.timeout(5):
            await r.ping()
    except Exception as e:
        problems.append(
            f"Redis is not reachable at {redact_url(settings.redis_url)} ({type(e).__name__}: {e}); "
            + _how_to_start("Redis")
        )
    finally:
        await r.aclose()
    return problems


def _check(settings: Settings, source: ConfigSource) -> int:
    problems = asyncio.run(_probe(settings))
    refused = source.status().last_error
    if refused:
        problems.append(
            f"the config API's document was refused, running from {source.status().source}: {refused}"
        )
    for p in problems:
        print(f"agentpool: {p}", file=sys.stderr)
    if not problems:
        print("ok: RabbitMQ, Redis and the pools file are fine")
    return EXIT_UNAVAILABLE if problems else EXIT_OK


def _worker(settings: Settings, config: Config, args: argparse.Namespace) -> int:
    from agentpool.workers.main import run_standby, run_worker

    if args.standby:
        return run_standby(settings, config, drain_timeout_s=args.drain_timeout_s)
    return run_worker(
        settings,
        config,
        args.pool,
        args.deployment,
        args.replica,
        drain_timeout_s=args.drain_timeout_s,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def _busy(host: str, port: int, flag: str) -> bool:
    """Print why ``host:port`` cannot be listened on (and what to do), if it cannot."""
    from agentpool import ports

    problem = ports.in_use(host, port)
    if problem is not None:
        print(f"agentpool: {problem}; stop it, or pick another port with {flag}", file=sys.stderr)
    return problem is not None


def _workers(
    settings: Settings,
    source: ConfigSource,
    pools: list[str] | None,
    metrics_port: int | None,
    standby: bool,
    metrics_host: str,
) -> int:
    import uvloop

    from agentpool.broker.config_source import reload_on_sighup
    from agentpool.workers.fleet_metrics import FleetMetrics
    from agentpool.workers.main import install_stop_signals
    from agentpool.workers.supervisor import Supervisor

    if metrics_port and _busy(metrics_host, metrics_port, "--metrics-port"):
        return EXIT_PORT_IN_USE

    async def run() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        reload_on_sighup(source)
        # metrics_port: one endpoint summing every worker
        sup = Supervisor(
            settings,
            source.config,
            pools=pools,
            metrics=FleetMetrics(metrics_port, addr=metrics_host) if metrics_port is not None else None,
            standby=standby,
            source=source,
        )
        await sup.async_run(stop)

    uvloop.run(run())
    return EXIT_OK


def _gateway(settings: Settings, source: ConfigSource, host: str, port: int) -> int:
    from agentpool.gateway.server import run_gateway

    if _busy(host, port, "--port"):
        return EXIT_PORT_IN_USE
    return run_gateway(settings, source.config, host, port, source=source)  # SIGHUP: reload


def _dev(settings: Settings, source: ConfigSource, host: str, port: int, metrics_port: int) -> int:
    """Workers (supervised) and the gateway in one command; Ctrl-C stops all of it cleanly.

    Everything that could clash with a running instance is checked before anything is touched:
    the ports first, then RabbitMQ and Redis. The dev key is this instance's own (another
    instance's keeps working) and is revoked when it stops.
    """
    import uvloop

    from agentpool.broker.config_source import reload_on_sighup
    from agentpool.gateway.server import server
    from agentpool.workers.fleet_metrics import FleetMetrics
    from agentpool.workers.main import install_stop_signals
    from agentpool.workers.supervisor import Supervisor

    if _busy(host, port, "--port") or (metrics_port and _busy(host, metrics_port, "--metrics-port")):
        return EXIT_PORT_IN_USE
    problems = asyncio.run(_probe(settings))
    if problems:
        for p in problems:
            print(f"agentpool: {p}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    key_id, key = asyncio.run(keys_cmd.dev_key(settings))
    print(keys_cmd.auth_banner(settings), flush=True)
    print(
        f"dev API key (tenant default, scopes ask+admin+fleet; this instance's, revoked when it stops):\n"
        f"  curl -s {host}:{port}/v1/keys -H 'X-API-Key: {key}'",
        flush=True,
    )

    async def run() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        gateway_source = source.fork()  # the gateway and the supervisor each apply a new config
        reload_on_sighup(source, gateway_source)
        sup = Supervisor(
            settings,
            source.config,
            env={"AGENTPOOL_LOG_FORMAT": "text"},
            metrics=FleetMetrics(metrics_port, addr=host),  # the workers' /metrics, on dev's host
            source=source,
        )
        sup_task = asyncio.create_task(sup.async_run(stop))
        srv = server(settings, None, host, port, embedded=True, source=gateway_source)
        srv_task = asyncio.create_task(srv.serve())
        await stop.wait()  # Ctrl-C / SIGTERM; a second one exits at once
        srv.should_exit = True
        await srv_task
        await sup_task

    try:
        uvloop.run(run())
    finally:
        asyncio.run(keys_cmd.revoke_dev_key(settings, key_id))
    return EXIT_OK


def _wait(settings: Settings, config: Config, pools: list[str], timeout_s: float) -> int:
    from agentpool.status import wait_ready

    ok, lines = asyncio.run(wait_ready(settings, config, pools, timeout_s))
    print("\n".join(lines))
    return EXIT_OK if ok else EXIT_TIMEOUT


def _scale(settings: Settings, config: Config, pool: str, deployment: str, replicas: int) -> int:
    from agentpool.broker.fleet import Fleet
    from agentpool.broker.redis_conn import connect
    from agentpool.broker.tenants import pool_config
    from agentpool.shared.names import Names
    from agentpool.shared.settings import Settings

    assert isinstance(settings, Settings)
    cfg_pool = pool_config(config, pool)
    if cfg_pool is None or deployment not in {d.name for d in cfg_pool.deployments}:
        print(f"agentpool: no deployment {deployment!r} in pool {pool!r}", file=sys.stderr)
        return EXIT_CONFIG
    cap = next(d.max_replicas for d in cfg_pool.deployments if d.name == deployment)
    if not 0 <= replicas <= cap:
        print(f"agentpool: replicas must be 0..{cap} (the deployment's max_replicas)", file=sys.stderr)
        return EXIT_CONFIG

    async def run() -> None:
        r = connect(settings.redis_url)
        try:  # also wakes an idle pool and nudges the supervisors to act at once
            await Fleet(r, Names(settings.namespace), config).set_desired(pool, deployment, replicas)
        finally:
            await r.aclose()

    asyncio.run(run())
    print(f"{pool}/{deployment}: desired replicas = {replicas}")
    return EXIT_OK


def _status(settings: Settings, source: ConfigSource, pool: str | None) -> int:
    from agentpool.status import render

    print(asyncio.run(render(settings, source.config, pool)))
    if pool is None:
        print("\n" + asyncio.run(_config_line(settings, source)))
    return EXIT_OK


async def _config_line(settings: Settings, source: ConfigSource) -> str:
    """Which config this command found (as a process starting now would), and Redis's last good one."""
    import time

    from agentpool.broker.config_source import last_good, status_line
    from agentpool.broker.redis_conn import connect, translated
    from agentpool.shared.names import Names

    r = connect(settings.redis_url)
    try:
        with translated(settings.redis_url):
            stored = await last_good(r, Names(settings.namespace))
    finally:
        await r.aclose()
    return status_line(source.status(), stored, time.time())


def _reload(settings: Settings, source: ConfigSource) -> int:
    """Have every gateway and supervisor of the namespace re-read its config (poll the config API, or
    re-read its pools file). Refused here first when the config this command finds is invalid."""
    from agentpool.broker.config_source import request_reload
    from agentpool.broker.redis_conn import connect, translated
    from agentpool.shared.names import Names

    status = source.status()
    if status.last_error:
        print(f"agentpool: {status.last_error}; nothing reloaded", file=sys.stderr)
        return EXIT_CONFIG

    async def run() -> int:
        r = connect(settings.redis_url)
        try:
            with translated(settings.redis_url):
                return await request_reload(r, Names(settings.namespace))
        finally:
            await r.aclose()

    heard = asyncio.run(run())
    where = status.url if status.source == "api" else status.path
    print(
        f"config {status.version} from {where} is valid; {heard} gateway/supervisor process(es) of "
        f"namespace {settings.namespace!r} asked to re-read theirs (each refuses an invalid one and "
        "keeps what it runs: see GET /v1/config)"
    )
    return EXIT_OK
