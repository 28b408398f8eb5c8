"""The Python client services use: ask and stream through real RabbitMQ and Redis."""

from __future__ import annotations

import pytest

from shared.errors import NotFound
from shared.messages import Chunk, End, Start
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


async def test_unknown_pool_is_not_found(make_system) -> None:
    system: System = await make_system(replicas=1)
    with pytest.raises(NotFound) as e:
        await system.client.ask("nope", "hi")
    assert e.value.error_code == "POOL_NOT_FOUND"


async def test_closed_client_refuses_to_reopen(make_system) -> None:
    system: System = await make_system(replicas=1, start=False)
    with pytest.raises(RuntimeError, match="cannot be reopened"):
        await system.client.start()
