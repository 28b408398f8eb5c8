"""A robust RabbitMQ connection with a small pool of confirming channels.

aio-pika errors are translated here, once: callers see :class:`QueueFull` (the broker nacked:
the queue is at its ``x-max-length``), :class:`QueueGone` (the message came back unroutable: no
such queue, e.g. a replica that drained and deleted its queue), or
:class:`agentpool.shared.errors.Unavailable` with ``BROKER_UNAVAILABLE`` (no connection, channel lost). A
publish whose connection was lost has an unknown outcome; the router may retry it elsewhere, and
workers dedupe by ``request_id``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from agentpool.shared.errors import Unavailable
from agentpool.shared.settings import redact_url

log = logging.getLogger("agentpool.amqp")

PUBLISH_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0  # aiormq waits for Close-Ok and the socket without a bound of its own


class QueueFull(Exception):
    """The broker refused the message: the queue is at its length limit (reject-publish)."""


class QueueGone(Unavailable):
    """The broker returned the message: no queue of that name (a replica's queue is deleted when
    the replica drains). An :class:`Unavailable` for callers that do not tell the two apart."""


def broker_unavailable(url: str, exc: BaseException | None = None) -> Unavailable:
    why = f": {exc}" if exc else ""
    return Unavailable(
        "RabbitMQ is not reachable",
        error_code="BROKER_UNAVAILABLE",
        retry_after_s=2,
        internal=f"{redact_url(url)}{why}",
    )


class Amqp:
    """One robust connection; ``publish`` round-robins over ``channels`` confirming channels."""

    def __init__(self, url: str, *, channels: int = 2) -> None:
        self.url = url
        self._n_channels = channels
        self._conn: AbstractRobustConnection | None = None
        self._channels: list[AbstractChannel] = []
        self._rr = itertools.cycle(range(channels))
        self._closed = False

    async def connect(self) -> None:
        if self._closed:
            raise RuntimeError("this Amqp was closed; make a new one")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                self._conn = await aio_pika.connect_robust(
                    self.url, client_properties={"connection_name": "agentpool"}
                )
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as e:
            raise broker_unavailable(self.url, e) from e
        for _ in range(self._n_channels):
            ch = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            self._channels.append(ch)

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._conn is None:
            raise RuntimeError("Amqp.connect() was not called")
        return self._conn

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed and self._conn.connected.is_set()

    async def channel(self, **kwargs: Any) -> AbstractChannel:
        """A new channel on the shared connection (for consumers and topology)."""
        return await self.connection.channel(**kwargs)

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> None:
        """Publish to ``queue`` via the default exchange and wait for the broker's confirm."""
        if not self._channels:
            raise broker_unavailable(self.url)
        channel = self._channels[next(self._rr)]
        message = aio_pika.Message(
            body,
            message_id=message_id,
            headers=headers,
            content_type="application/msgpack",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            if persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await channel.default_exchange.publish(
                message, routing_key=queue, mandatory=True, timeout=PUBLISH_TIMEOUT_S
            )
        except aio_pika.exceptions.PublishError as e:  # returned: no such queue (first: a DeliveryError too)
            raise QueueGone(
                f"queue {queue} does not exist", error_code="BROKER_UNAVAILABLE", retry_after_s=1
            ) from e
        except aio_pika.exceptions.DeliveryError as e:  # nacked: reject-publish at x-max-length
            raise QueueFull(queue) from e
        except (
            aiormq.exceptions.AMQPError,
            aio_pika.exceptions.AMQPError,
            ConnectionError,
            TimeoutError,
            RuntimeError,  # aio-pika: "channel closed" while reconnecting
        ) as e:
            raise broker_unavailable(self.url, e) from e

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        self._channels = []
        if conn is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await conn.close()
            except TimeoutError:
                log.warning("RabbitMQ connection did not close in %.0fs; leaving it", CLOSE_TIMEOUT_S)
