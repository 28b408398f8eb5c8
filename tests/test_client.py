"""The Python client services use: ask and stream through real RabbitMQ and Redis."""

from __future__ import annotations

import pytest

from agentpool.broker.streams import entry_order
from agentpool.shared.errors import NotFound
from agentpool.shared.messages import Chunk, End, Error, Start
from tests.conftest import System

pytestmark = pytest.mark.timeout(60)


async def test_ask_returns_a_complete_answer(make_system) -> None:
    system: System = await make_system(replicas=1)
    reply = await system.client.ask("p", "hello there", thread_id="th-1")
    assert isinstance(reply, End)
    assert reply.content.startswith("[0 earlier] Re: hello there")
    assert reply.agent_id == "p-main-1"
    assert reply.usage.output_tokens == 12
    assert reply.timings.total_ms > 0


async def test_stream_yields_start_chunks_end_in_order(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=400, reply_tokens=15)
    events = [e async for e in system.client.stream("p", "stream please")]
    assert isinstance(events[0], Start) and isinstance(events[-1], End)
    chunks = [e for e in events[1:-1] if isinstance(e, Chunk)]
    assert len(chunks) >= 10  # paced tokens arrive as separate chunks
    assert "".join(c.text for c in chunks) == events[-1].content


async def test_an_instant_reply_lands_as_one_chunk_with_its_end(make_system) -> None:
    # Given a model that produces the whole reply at once (fake, no pacing)
    system: System = await make_system(replicas=1, tokens_per_s=0, reply_tokens=20)
    client = system.client
    events = [e async for e in client.stream("p", "all at once")]
    # Then the text comes as one chunk, written in the same step as the end event
    assert [type(e) for e in events] == [Start, Chunk, End]
    assert events[1].text == events[2].content and events[2].usage.output_tokens == 20
    entries = await client.redis.xrange(client.names.reply(events[2].request_id))
    assert [f[b"t"] for _, f in entries] == [b"start", b"chunk", b"end"]
    (chunk_ms, chunk_seq), (end_ms, end_seq) = (entry_order(i) for i, _ in entries[1:])
    assert (end_ms, end_seq) == (chunk_ms, chunk_seq + 1)  # one Lua call: adjacent ids


async def test_a_second_finish_writes_neither_its_chunk_nor_its_end(make_system) -> None:
    system: System = await make_system(start=False)
    store, rid = system.client.store, "f" * 32
    first = Error(request_id=rid, error_code="PROVIDER_ERROR", error="one")
    assert await store.finish(first, last_chunk=Chunk(text="one"))
    again = Error(request_id=rid, error_code="PROVIDER_ERROR", error="two")
    assert not await store.finish(again, last_chunk=Chunk(text="two"))
    entries = await system.client.redis.xrange(system.client.names.reply(rid))
    assert [(f[b"t"], b"one" in f[b"d"]) for _, f in entries] == [(b"chunk", True), (b"error", True)]


async def test_unknown_pool_is_not_found(make_system) -> None:
    system: System = await make_system(replicas=1)
    with pytest.raises(NotFound) as e:
        await system.client.ask("nope", "hi")
    assert e.value.error_code == "POOL_NOT_FOUND"


async def test_closed_client_refuses_to_reopen(make_system) -> None:
    system: System = await make_system(replicas=1, start=False)
    with pytest.raises(RuntimeError, match="cannot be reopened"):
        await system.client.start()
