"""RabbitMQ topology for pools and replicas (see README.md, "Architecture in a few lines").

Per replica: a classic durable queue bounded by ``x-max-length = max_depth - concurrency`` with
``reject-publish`` (a full queue nacks, the router tries the next replica), a queue-wide TTL of
``rescue_after_s`` whose expired messages dead-letter into the pool's shared queue (so requests
queued behind a dead or stuck replica reach a live one), and ``x-expires`` far above the TTL.
A replica that drains gracefully deletes its own queue once it is empty (see
``agentpool.workers.runtime.Worker.drain``); ``x-expires`` removes the queues of replicas that died. A
publish to a deleted queue comes back unroutable (``agentpool.broker.amqp.QueueGone``) and the router tries
the next replica. Changing these arguments breaks redeclaring existing queues
(PRECONDITION_FAILED), so they stay as they are.
Per pool: a shared queue every replica consumes, and a parking queue for poison messages. Only
pools that run replicas get them: a ``per_tenant`` template's pools are ``{template}--{tenant}``.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue, ExchangeType

from agentpool.shared.config import Pool
from agentpool.shared.names import Names

REPLICA_QUEUE_EXPIRES_MS = 6 * 3600 * 1000


def replica_queue_arguments(names: Names, pool_name: str, pool: Pool) -> dict[str, Any]:
    lim = pool.limits
    return {
        "x-queue-type": "classic",
        "x-max-length": lim.max_depth - lim.concurrency,
        "x-overflow": "reject-publish",
        "x-message-ttl": int(lim.rescue_after_s * 1000),
        "x-dead-letter-exchange": names.pool_exchange(pool_name),
        "x-dead-letter-routing-key": names.pool_queue(pool_name),
        "x-expires": REPLICA_QUEUE_EXPIRES_MS,
    }


async def declare_pool(channel: AbstractChannel, names: Names, pool_name: str) -> AbstractQueue:
    """The pool's dead-letter exchange, shared queue and parking queue; returns the shared queue."""
    exchange = await channel.declare_exchange(
        names.pool_exchange(pool_name), ExchangeType.DIRECT, durable=True
    )
    shared = await channel.declare_queue(
        names.pool_queue(pool_name), durable=True, arguments={"x-queue-type": "classic"}
    )
    await shared.bind(exchange, routing_key=names.pool_queue(pool_name))
    await channel.declare_queue(
        names.parking_queue(pool_name), durable=True, arguments={"x-queue-type": "classic"}
    )
    return shared


async def declare_replica(
    channel: AbstractChannel, names: Names, pool_name: str, pool: Pool, replica_id: str
) -> AbstractQueue:
    return await channel.declare_queue(
        names.replica_queue(replica_id),
        durable=True,
        arguments=replica_queue_arguments(names, pool_name, pool),
    )


def pool_queue_names(names: Names, pool_name: str) -> list[str]:
    return [names.pool_queue(pool_name), names.parking_queue(pool_name)]
