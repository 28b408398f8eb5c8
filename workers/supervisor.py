"""The supervisor: keeps every deployment at its desired replica count with worker processes.

Several supervisors (hosts, containers) share the count through Redis leases (broker/leases.py):
each replica slot ``(pool, deployment, n)`` is run by the one supervisor holding its lease, and a
slot is claimed only while fewer than the desired slots are active, so the fleet runs exactly the
desired replicas with unique ids. Each supervisor first claims its fair share (desired / live
supervisors of the pool, counted ``DISCOVERY_S`` after it announced itself), then any deficit
left unfilled for ``STARVE_S``; a dead supervisor's leases lapse after ``LEASE_TTL_MS`` and the
others claim its slots.

Desired counts come from broker/fleet.py: ``desired:{pool}:{deployment}`` (``agentpool scale`` or
the admin API), else the pools file; a pool idle for ``idle_timeout_s`` runs ``min_replicas``.
A replica that dies is restarted in its slot with exponential backoff; surplus replicas (starting
or idle ones first) get SIGTERM and drain. Supervisors poll every ``RECONCILE_S`` and act at once
on a nudge published on the fleet channel (scale, wake, restart, new tenant pool).

The config can change while it runs (broker/config_source.py: a config API, ``agentpool reload``,
SIGHUP): :meth:`Supervisor.apply_config` swaps it between two reconcile rounds, and
workers/reconfig.py makes the fleet follow (new pools start, counts follow, changed agent types
roll, removed pools and deployments retire). Workers get the config in a file of its version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import tempfile
import time

from agentpool.broker import tenants
from agentpool.broker.config_source import ConfigSource, config_version, deployment_fingerprint
from agentpool.broker.fleet import Fleet, FleetMemory, PoolSnapshot
from agentpool.broker.leases import RETIRING, Leases, Peers, new_owner_id, slot_count
from agentpool.broker.redis_conn import REDIS_ERRORS, check_persistence, connect
from agentpool.shared.config import Config
from agentpool.shared.errors import Unavailable
from agentpool.shared.names import Names, replica_id
from agentpool.shared.settings import Settings
from agentpool.shared.tasks import cancel_and_wait
from agentpool.workers import procs, reconfig, rolling
from agentpool.workers.fleet_metrics import FleetMetrics
from agentpool.workers.procs import Replica

log = logging.getLogger("agentpool.supervisor")

RECONCILE_S = 0.5
RENEW_S = 0.5
STARVE_S = 2.0  # a deficit this old is filled even beyond our fair share
DISCOVERY_S = 0.3  # after announcing ourselves, wait this long for peers before the first claim
STOP_TIMEOUT_S = 40.0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        config: Config,
        *,
        pools: list[str] | None = None,
        env: dict[str, str] | None = None,
        metrics: FleetMetrics | None = None,
        metrics_port: int | None = None,
        standby: bool = True,
        source: ConfigSource | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.source = source or ConfigSource(settings, config)  # polls a config API, reloads the file
        self.extra_env = env or {}
        if metrics is None and metrics_port is not None:
            metrics = FleetMetrics(metrics_port)  # one /metrics endpoint summing every worker
        self.metrics = metrics  # started and closed with the supervisor
        # A spare process with the imports done takes the next slot to start (see procs.Standby).
        self.standby = procs.Standby() if standby else None
        self.names = Names(settings.namespace)
        self.only = set(pools) if pools else None
        self.redis = connect(settings.redis_url)
        self.owner = new_owner_id("sup")
        self.leases = Leases(self.redis, self.names, self.owner, slots=self._slots)
        self.peers = Peers(self.redis, self.names, self.owner)
        self.fleet = Fleet(self.redis, self.names, config)
        self.memory = FleetMemory(self.fleet)  # puts back what a Redis that lost its data forgot
        self.replicas: dict[tuple[str, str, int], Replica] = {}
        self.restarts: dict[str, rolling.Step] = {}
        self._nudge = asyncio.Event()
        self._short_since: dict[tuple[str, str], float] = {}
        self._pools: list[str] = []
        self._closing = False
        self._round = asyncio.Lock()  # a reconcile round, or a new config being applied
        self._config_dir: str | None = None  # the workers' config files (procs.write_config)
        self._config_file: str | None = None

    def _slots(self, pool: str, deployment: str) -> int:
        cfg = self.fleet.pool_config(pool)
        dep = next((d for d in cfg.deployments if d.name == deployment), None) if cfg else None
        return slot_count(dep.max_replicas if dep is not None else 0)

    # --- lifecycle
    async def async_run(self, stop: asyncio.Event) -> None:
        helpers = [
            asyncio.create_task(self._listen(), name="fleet-listen"),
            asyncio.create_task(self._on_stop(stop), name="stop-nudge"),
        ]
        renewer = asyncio.create_task(self._renew_loop(), name="lease-renew")
        try:
            if self.metrics is not None:
                self.metrics.start()
            async with self.source.running(self.redis, self.apply_config):
                await self._run(stop)
        finally:
            self._closing = True
            await cancel_and_wait(helpers)
            await self.shutdown()
            await cancel_and_wait([renewer])
            await self._let_go()
            await self.redis.aclose()
            if self.metrics is not None:
                self.metrics.close()
            if self._config_dir is not None:
                shutil.rmtree(self._config_dir, ignore_errors=True)

    async def _run(self, stop: asyncio.Event) -> None:
        async with self._round:
            await self.boot()  # announces us to the pools' other supervisors
        settle_until = time.monotonic() + DISCOVERY_S
        if self.standby is not None:
            await self.standby.refill(self.env())
        # Like Kafka's initial rebalance delay: supervisors started together see each other
        # before their first claim, so they split the slots instead of the first taking all.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, settle_until - time.monotonic())):
                await stop.wait()
        while not stop.is_set():
            self._nudge.clear()
            try:
                async with self._round:
                    await self.reconcile()
            except (*REDIS_ERRORS, Unavailable) as e:
                log.warning("reconcile failed (%s); retrying", e)
            with contextlib.suppress(TimeoutError):  # asyncio.timeout keeps a cancel a cancel
                async with asyncio.timeout(RECONCILE_S):
                    await self._nudge.wait()

    async def apply_config(self, config: Config) -> None:
        """Run ``config`` from the next reconcile round on (see workers/reconfig.py)."""
        async with self._round:
            await reconfig.prepare(self, config)  # the Redis part first: a failure changes nothing
            self.config = self.fleet.config = self.fleet.tenants.config = config
            self._config_file = None
            reconfig.mark_outdated(self)
        self._nudge.set()

    async def boot(self) -> None:
        """Pre-warm: pools with ``prewarm`` count as used now; configured tenants get their pools."""
        try:
            await check_persistence(self.redis, self.settings.redis_url, "supervisor")
            for name in tenants.configured(self.config):
                if self.wants(name):
                    await self._ensure_tenant_pool(name)
            for name in await self.fleet.pool_names():
                cfg = self.fleet.pool_config(name)
                if cfg is not None and cfg.prewarm and self.wants(name):
                    await self.fleet.touch(name)
            # Announce ourselves before claiming, so supervisors started together split the slots.
            self._pools = await self.managed_pools()
            await self.peers.beat(self._pools, int(time.time() * 1000))
        except REDIS_ERRORS as e:
            log.warning("could not pre-warm pools: %s", e)

    async def _ensure_tenant_pool(self, name: str) -> None:
        try:
            await self.fleet.tenants.ensure(name)
        except Unavailable as e:
            log.error("per-tenant pool %s not made: %s", name, e.message)

    def wants(self, pool: str) -> bool:
        """Is ``pool`` ours to run (``--pool`` filter; a per-tenant pool goes with its template)?"""
        parts = tenants.split(pool)
        return self.only is None or (parts[0] if parts else pool) in self.only

    async def shutdown(self) -> None:
        """Hand our share to the other supervisors at once, then drain every replica we run."""
        mine = list(self.replicas.values())
        for r in mine:
            if not r.lost and not r.stopping:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.leases.retire(r.pool, r.deployment, r.n, limit=-1)
        await procs.stop_all(mine, STOP_TIMEOUT_S)
        if self.standby is not None:
            await self.standby.aclose()

    async def _let_go(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            for r in self.replicas.values():
                if not r.lost:
                    await self.leases.release(r.pool, r.deployment, r.n)
            for pool in self.restarts:
                await self.leases.unlock(rolling.lock_name(pool))
            await self.peers.leave(self._pools)
        self.replicas.clear()

    # --- background
    async def _on_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._nudge.set()

    async def _listen(self) -> None:
        """Reconcile as soon as someone scales, wakes or restarts a pool (the poll is the fallback)."""
        while not self._closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.fleet.keys.channel)
                while not self._closing:
                    if await pubsub.get_message(timeout=5.0) is not None:
                        self._nudge.set()
            except REDIS_ERRORS as e:
                log.warning("fleet channel lost (%s); polling meanwhile", e)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(1.0)

    async def _renew_loop(self) -> None:
        """Keep our leases (and restart locks) alive; a lease someone else took stops its replica."""
        while True:  # runs on while shutdown() drains (our slots stay ours); cancelled after it
            await asyncio.sleep(RENEW_S)
            try:
                await self._renew_all()
            except REDIS_ERRORS as e:
                log.warning("lease renewal failed: %s", e)

    async def _renew_all(self) -> None:
        for r in list(self.replicas.values()):
            if r.lost or self.replicas.get(r.key) is not r:
                continue
            if not await self.leases.renew(r.pool, r.deployment, r.n, retiring=r.stopping):
                log.error("lease of %s taken by another owner; stopping our copy", r.id)
                r.lost = True
                procs.terminate(r)
        for pool in list(self.restarts):
            if not await self.leases.relock(rolling.lock_name(pool)):
                self.restarts.pop(pool, None)

    # --- reconcile
    async def managed_pools(self) -> list[str]:
        """Pools to look after: static and per-tenant ones, and any we still run replicas of."""
        running = [r.pool for r in self.replicas.values()]
        return [p for p in dict.fromkeys([*await self.fleet.pool_names(), *running]) if self.wants(p)]

    async def reconcile(self) -> None:
        # Listed before the check: a Redis that loses its data between the two is caught by the
        # check, and the list is read again once restored (else its tenant pools would count as
        # evicted for a round, and the memory would forget them)
        listed = await self.fleet.pool_names()
        if await self.memory.check():
            listed = await self.fleet.pool_names()
        self.memory.saw_pools(listed)
        running = [r.pool for r in self.replicas.values()]
        self._pools = [p for p in dict.fromkeys([*listed, *running]) if self.wants(p)]
        peers = await self.peers.beat(self._pools, int(time.time() * 1000))
        for pool in self._pools:
            cfg = self.fleet.pool_config(pool)
            await reconfig.retire_removed(self, pool, cfg)
            if cfg is None:
                continue
            snap = self.memory.fill(await self.fleet.snapshot(pool))
            for dep in cfg.deployments:
                want = snap.desired(dep.name) if pool in listed else 0  # an evicted tenant pool: none
                await self._deployment(snap, dep.name, want, peers.get(pool, 1))
            if (
                snap.restart_generation
                or snap.drains
                or pool in self.restarts
                or reconfig.outdated(self, pool)
            ):
                await rolling.advance(self, snap)
        await self._reap()

    async def _deployment(self, snap: PoolSnapshot, dep: str, want: int, n_peers: int) -> None:
        await self._supervise(snap.name, dep)
        holders = await self.leases.holders(snap.name, dep)
        active = sorted(n for n, v in holders.items() if not v.endswith(RETIRING))
        key = (snap.name, dep)
        if self.metrics is not None:
            running = sum(r.alive for r in self.replicas.values() if (r.pool, r.deployment) == key)
            self.metrics.record(snap.name, dep, want, running)
        if len(active) < want:
            short_since = self._short_since.setdefault(key, time.monotonic())
            await self._grow(snap, dep, want, len(active), n_peers, time.monotonic() - short_since > STARVE_S)
            return
        self._short_since.pop(key, None)
        if len(active) > want:
            allowed = want + (1 if await self.leases.locked(rolling.lock_name(snap.name)) else 0)
            if len(active) > allowed:
                await self._shrink(snap, dep, active, allowed)

    async def _supervise(self, pool: str, dep: str) -> None:
        """Restart our dead replicas in their slots (with backoff)."""
        now = time.monotonic()
        for r in list(self.replicas.values()):
            if r.pool != pool or r.deployment != dep or r.stopping:
                continue
            if r.proc is not None and r.proc.returncode is not None:
                self._exited(r, unexpected=True)
                procs.on_exit(r, now)
            if r.proc is None and now >= r.next_start:
                await procs.spawn(r, self.env(), self.standby)

    async def _grow(
        self, snap: PoolSnapshot, dep: str, want: int, active: int, n_peers: int, starving: bool
    ) -> None:
        mine = sum(
            1 for r in self.replicas.values() if (r.pool, r.deployment) == (snap.name, dep) and not r.stopping
        )
        room = want - active if starving else min(want - active, math.ceil(want / n_peers) - mine)
        for _ in range(room):
            n = await self.leases.claim(snap.name, dep, want)
            if n is None:
                return
            await self.start(snap.name, dep, n, snap.restart_generation)

    async def _shrink(self, snap: PoolSnapshot, dep: str, active: list[int], allowed: int) -> None:
        """Retire the surplus, starting or idle replicas first; each owner retires its own."""
        ranked = sorted(active, key=lambda n: self.rank(snap, dep, n))
        for n in ranked[: len(active) - allowed]:
            r = self.replicas.get((snap.name, dep, n))
            if r is None or r.stopping:
                continue
            if await self.leases.retire(snap.name, dep, n, allowed):
                log.info("retiring replica %s (%d active, want %d)", r.id, len(active), allowed)
                procs.terminate(r)

    def rank(self, snap: PoolSnapshot, dep: str, n: int) -> tuple[int, int, int]:
        """Order to stop replicas in: starting/unhealthy first, then the least loaded, newest slot first."""
        rid = replica_id(snap.name, dep, n)
        info = next((r for r in snap.replicas if r.id == rid), None)
        if info is None or info.status != "ready":
            return (0, 0, -n)
        return (1, info.depth, -n)

    async def start(self, pool: str, dep: str, n: int, generation: int) -> Replica:
        r = Replica(pool, dep, n, generation, deployment_fingerprint(self.config, pool, dep) or "")
        self.replicas[r.key] = r
        await procs.spawn(r, self.env(), self.standby)
        log.info("started replica %s (pid %d)", r.id, r.pid)
        return r

    def env(self) -> dict[str, str]:
        metrics_env = self.metrics.env() if self.metrics is not None else {}
        return procs.worker_env(self.settings, {**self.extra_env, **metrics_env}, self._worker_config())

    def _worker_config(self) -> str:
        """The file of the config we run, for the workers we start (written once per version)."""
        if self._config_file is None or not os.path.exists(self._config_file):
            if self._config_dir is None:
                self._config_dir = tempfile.mkdtemp(prefix=f"agentpool-{self.names.ns}-config-")
            os.makedirs(self._config_dir, exist_ok=True)  # a temp cleaner may have taken it
            self._config_file = procs.write_config(self.config, self._config_dir, config_version(self.config))
        return self._config_file

    def _exited(self, r: Replica, unexpected: bool) -> None:
        if self.metrics is not None and r.proc is not None:
            self.metrics.exited(r.pool, r.deployment, r.proc.pid, unexpected)

    async def _reap(self) -> None:
        """Forget retired replicas whose process has exited, and free their slots."""
        for key, r in list(self.replicas.items()):
            if r.stopping and not r.alive:
                self._exited(r, unexpected=False)
                if not r.lost:
                    await self.leases.release(r.pool, r.deployment, r.n)
                del self.replicas[key]
