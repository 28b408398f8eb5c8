"""Every Redis key and RabbitMQ name, in one place, under the settings' namespace."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    ns: str = "ap"

    # --- RabbitMQ
    def replica_queue(self, replica_id: str) -> str:
        return f"{self.ns}.replica.{replica_id}"

    def pool_queue(self, pool: str) -> str:
        """Shared by all replicas of a pool: rescued and dead-lettered requests land here."""
        return f"{self.ns}.pool.{pool}"

    def pool_exchange(self, pool: str) -> str:
        """Dead-letter exchange of the pool's replica queues; routes to ``pool_queue``."""
        return f"{self.ns}.pool.{pool}.dlx"

    def parking_queue(self, pool: str) -> str:
        return f"{self.ns}.parked.{pool}"

    # --- Redis
    def reply(self, request_id: str) -> str:
        return f"{self.ns}:reply:{request_id}"

    def thread(self, tenant: str, thread_id: str) -> str:
        return f"{self.ns}:thread:{tenant}:{thread_id}"

    def replica(self, pool: str, replica_id: str) -> str:
        return f"{self.ns}:replica:{pool}:{replica_id}"

    def members(self, pool: str) -> str:
        """Sorted set: replica id -> heartbeat expiry (unix s)."""
        return f"{self.ns}:members:{pool}"

    def desired(self, pool: str, deployment: str) -> str:
        return f"{self.ns}:desired:{pool}:{deployment}"

    def cancel(self, request_id: str) -> str:
        return f"{self.ns}:cancel:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.ns}:done:{request_id}"

    def attempts(self, request_id: str) -> str:
        return f"{self.ns}:attempts:{request_id}"

    def run(self, request_id: str) -> str:
        """Hash: a run paused for approval (pool, tenant, thread_id, the worker's state blob)."""
        return f"{self.ns}:run:{request_id}"

    def resumed(self, request_id: str) -> str:
        """The request id of the run that continues a paused one (claimed once)."""
        return f"{self.ns}:resumed:{request_id}"

    def waiting(self, tenant: str, thread_id: str) -> str:
        """The paused request a thread waits on; other requests to the thread are refused meanwhile."""
        return f"{self.ns}:waiting:{tenant}:{thread_id}"

    def idem(self, tenant: str, key: str) -> str:
        return f"{self.ns}:idem:{tenant}:{key}"

    # --- external API (gateway/): keys, request owners, rate limits, webhooks
    def api_key(self, key_id: str) -> str:
        """Hash: sha256, tenant, scopes, created_at (never the key itself)."""
        return f"{self.ns}:apikey:{key_id}"

    def api_keys(self) -> str:
        """Set of the ids of keys created in Redis (CLI, admin API, ``agentpool dev``)."""
        return f"{self.ns}:apikeys"

    def owner(self, request_id: str) -> str:
        """The tenant that made a request, so only it can read the result."""
        return f"{self.ns}:owner:{request_id}"

    def rate(self, kind: str, ident: str) -> str:
        """GCRA state (theoretical arrival time, ms) of one limit: ``kind`` is key or pool."""
        return f"{self.ns}:rate:{kind}:{ident}"

    def webhooks_due(self) -> str:
        """Sorted set: delivery id -> unix ms when a gateway should next look at it."""
        return f"{self.ns}:webhooks:due"

    def webhook_leases(self) -> str:
        """Hash: delivery id -> token of the gateway whose delivery task holds it."""
        return f"{self.ns}:webhooks:leases"

    def webhook(self, delivery_id: str) -> str:
        return f"{self.ns}:webhook:{delivery_id}"

    def webhook_secret(self, tenant: str) -> str:
        return f"{self.ns}:webhook-secret:{tenant}"

    def history(self, pool: str, bucket: int) -> str:
        """Hash: a pool's counts over one ``HISTORY_BUCKET_S`` bucket starting at unix s ``bucket``."""
        return f"{self.ns}:hist:{pool}:{bucket}"

    def drains(self, pool: str) -> str:
        """Hash: replica id -> pid of the process an operator asked to drain (and replace)."""
        return f"{self.ns}:drain:{pool}"

    def pattern(self) -> str:
        return f"{self.ns}:*"


def replica_id(pool: str, deployment: str, n: int) -> str:
    return f"{pool}-{deployment}-{n}"
