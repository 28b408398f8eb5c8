"""``agentpool keys create|list|revoke``, and the key ``agentpool dev`` prints.

A created key is printed once and never stored in plain: only its SHA-256 is kept in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    """Register ``keys`` on the top-level subparsers."""
    from agentpool.shared.api_config import SCOPES

    k = sub.add_parser("keys", help="API keys: create (printed once), list, revoke")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="create a key for a tenant and print it once")
    c.add_argument("--tenant", required=True)
    c.add_argument("--scope", action="append", choices=list(SCOPES), help="repeatable; default: ask")
    c.add_argument("--rpm", type=int, help="this key's requests per minute (default: the pools file's)")
    ls = ks.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--tenant")
    r = ks.add_parser("revoke", help="revoke a key at once")
    r.add_argument("key_id")


def run(settings: Any, config: Any, args: argparse.Namespace) -> int:
    actions = {"create": _create, "list": _list, "revoke": _revoke}
    return asyncio.run(actions[args.keys_command](settings, config, args))


async def _with_store(settings: Any, fn: Any) -> Any:
    from agentpool.broker.redis_conn import connect, translated
    from agentpool.gateway.keys import KeyStore
    from agentpool.shared.names import Names

    r = connect(settings.redis_url)
    try:
        with translated(settings.redis_url):
            return await fn(KeyStore(r, Names(settings.namespace)))
    finally:
        await r.aclose()


async def _create(settings: Any, config: Any, args: argparse.Namespace) -> int:
    from agentpool.shared.errors import BadRequest

    if args.rpm is not None and args.rpm < 0:
        print("agentpool: --rpm must be >= 0 (0 = unlimited)", file=sys.stderr)
        return EXIT_USAGE
    try:
        info, key = await _with_store(
            settings, lambda s: s.create(args.tenant, args.scope or ["ask"], rpm=args.rpm)
        )
    except BadRequest as e:
        print(f"agentpool: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    print(f"created key {info.id} for tenant {info.tenant} (scopes: {' '.join(info.scopes)})")
    print("store it now; it is not kept and cannot be shown again:")
    print(key)
    return EXIT_OK


async def _list(settings: Any, config: Any, args: argparse.Namespace) -> int:
    keys = await _with_store(settings, lambda s: s.list(args.tenant))
    keys += [
        _config_info(i, e)
        for i, e in enumerate(config.api_keys)
        if args.tenant is None or e.tenant == args.tenant
    ]
    print(f"{'ID':<18} {'TENANT':<16} {'SCOPES':<10} {'SOURCE':<7} {'RPM':>7}  CREATED")
    for k in keys:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at)) if k.created_at else "-"
        rpm = "default" if k.requests_per_minute is None else str(k.requests_per_minute)
        print(f"{k.id:<18} {k.tenant:<16} {','.join(k.scopes):<10} {k.source:<7} {rpm:>7}  {created}")
    return EXIT_OK


def _config_info(i: int, entry: Any) -> Any:
    from agentpool.gateway.keys import KeyInfo

    return KeyInfo(
        id=entry.id or f"config-{i}",
        tenant=entry.tenant,
        scopes=list(entry.scopes),
        created_at=0.0,
        source="config",
        requests_per_minute=entry.requests_per_minute,
    )


async def _revoke(settings: Any, config: Any, args: argparse.Namespace) -> int:
    if not await _with_store(settings, lambda s: s.revoke(args.key_id)):
        print(
            f"agentpool: no key {args.key_id!r} in Redis (keys from the pools file are removed there)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"revoked {args.key_id}")
    return EXIT_OK


async def dev_key(settings: Any) -> tuple[str, str]:
    """A fresh key for tenant default with every scope -> ``(key id, key)``; this instance's own.

    Another ``agentpool dev`` in the namespace keeps its key: each revokes its own when it stops.
    """
    info, key = await _with_store(
        settings, lambda s: s.create("default", ["ask", "admin", "fleet"], dev=True)
    )
    return info.id, str(key)


async def revoke_dev_key(settings: Any, key_id: str) -> None:
    from agentpool.shared.errors import Unavailable

    try:
        await _with_store(settings, lambda s: s.revoke(key_id))
    except Unavailable:  # Redis gone at exit: the key dies with its data, or stays listed as `dev`
        pass


def auth_banner(settings: Any) -> str:
    """One line: does this process serve callers without a key, and how to change it."""
    if settings.auth == "open":
        return (
            "auth: open (agentpool dev; AGENTPOOL_AUTH=required to change): requests without a key run "
            "as tenant default with every scope, a key that is sent is checked; `agentpool gateway` "
            "requires a key unless AGENTPOOL_AUTH=open"
        )
    return "auth: required (AGENTPOOL_AUTH=required): every request needs a key (the dev key works)"
