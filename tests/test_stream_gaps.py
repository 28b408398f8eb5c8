"""Reply streams that lost entries (a Redis that lost its newest writes) are repaired, not shown.

Each entry an attempt's worker writes carries the attempt's chunk count (field ``n``). The streams
here are written with the worker's own ReplyStore, then one entry is deleted the way a Redis
restart loses it, and read back through the gateway (SSE) and the Python client: a reader that
finds a count off sends ``restart`` (reason gap) and the whole text before the final event, so
the chunks after the last restart always add up to ``end.content``.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from agentpool.broker.client import Ticket
from agentpool.broker.streams import CHUNK_COUNT
from agentpool.shared.messages import (
    EVENT_DECODER,
    Chunk,
    End,
    Restart,
    Start,
    Timings,
    ToolCall,
    Usage,
    event_fields,
)
from tests.conftest import System, running_gateway
from tests.test_gateway import parse_sse

pytestmark = pytest.mark.timeout(30)

SSE = {"Accept": "text/event-stream"}


async def written(system: System, pieces: list[str], attempts: int = 1, step_after: int = 0) -> str:
    """A finished reply stream of ``attempts`` attempts, each streaming ``pieces``, as a worker writes
    it (start, chunks, an optional step event, end with the last chunk); -> its request id."""
    client = system.client
    rid = f"gap-{uuid.uuid4().hex[:12]}"
    key = client.names.reply(rid)
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            await client.redis.xadd(key, event_fields(Restart(attempt=attempt, agent_id="p-main-1")))  # type: ignore[arg-type]
        start = Start(request_id=rid, agent_id="p-main-1", attempt=attempt)
        await client.redis.xadd(key, event_fields(start))  # type: ignore[arg-type]
        *body, tail = pieces
        chunks = 0
        for i, text in enumerate(body, 1):
            await client.store.append(rid, [Chunk(text=text, attempt=attempt)], chunks)
            chunks += 1
            if i == step_after:
                step = ToolCall(id="c1", name="lookup", arguments={}, attempt=attempt)
                await client.store.append(rid, [step], chunks)
    end = End(
        request_id=rid,
        thread_id="t",
        agent_id="p-main-1",
        content="".join(pieces),
        usage=Usage(),
        timings=Timings(),
        created_at=time.time(),
        attempt=attempts,
    )
    assert await client.store.finish(end, last_chunk=Chunk(text=tail, attempt=attempts), chunks=chunks)
    await client.redis.set(client.names.owner(rid), "default", ex=600)
    return rid


async def entries(system: System, rid: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return await system.client.redis.xrange(system.client.names.reply(rid))  # type: ignore[no-any-return]


async def lose(system: System, rid: str, kind: bytes, nth: int = 1) -> bytes:
    """Delete the ``nth`` entry of ``kind`` (as a Redis restart loses its newest writes) -> its id."""
    found = [i for i, f in await entries(system, rid) if f[b"t"] == kind]
    await system.client.redis.xdel(system.client.names.reply(rid), found[nth - 1])
    return found[nth - 1]  # type: ignore[no-any-return]


def after_last_restart(events: list[dict[str, str]]) -> tuple[str, dict[str, object]]:
    """(text of the chunks after the last restart event, the final event's data)."""
    last = max((i for i, e in enumerate(events) if e["event"] == "restart"), default=-1)
    text = "".join(json.loads(e["data"])["text"] for e in events[last + 1 :] if e["event"] == "chunk")
    return text, json.loads(events[-1]["data"])


PIECES = ["The ", "quick ", "brown ", "fox."]


@pytest.mark.parametrize(
    ("lost", "attempts"),
    [
        ([(b"chunk", 2)], 1),  # a chunk in the middle
        ([(b"chunk", 4)], 1),  # the last chunk (written with the end): the end's count says so
        # a new attempt's restart and start (one script writes both): its chunks count from 1 again
        ([(b"restart", 1), (b"start", 2)], 2),
    ],
    ids=["middle-chunk", "last-chunk", "restart-event"],
)
async def test_a_lost_entry_is_repaired_with_the_whole_text(
    make_system, lost: list[tuple[bytes, int]], attempts: int
) -> None:
    system: System = await make_system(replicas=1, start=False)
    rid = await written(system, PIECES, attempts=attempts)
    for kind, nth in reversed(lost):
        await lose(system, rid, kind, nth)
    gateway = running_gateway(system.settings, system.config)
    async with gateway as url, httpx.AsyncClient(base_url=url) as http:
        events = parse_sse((await http.get(f"/v1/requests/{rid}", headers=SSE)).text)
    # Then the gateway said restart (gap) and sent the whole text before the end
    assert events[-1]["event"] == "end"
    restarts = [json.loads(e["data"]) for e in events if e["event"] == "restart"]
    assert restarts[-1]["reason"] == "gap", events
    text, end = after_last_restart(events)
    assert text == end["content"] == "The quick brown fox."
    # and the Python client repairs it the same way
    got = [
        EVENT_DECODER.decode(data)
        async for _id, _kind, data in system.client.stream_raw(Ticket(rid, "", "", "", "resume"))
    ]
    last = max(i for i, e in enumerate(got) if isinstance(e, Restart))
    assert "".join(e.text for e in got[last:] if isinstance(e, Chunk)) == "The quick brown fox."


async def test_a_gap_right_after_the_resume_point_is_seen(make_system) -> None:
    system: System = await make_system(replicas=1, start=False)
    rid = await written(system, PIECES)
    chunks = [i for i, f in await entries(system, rid) if f[b"t"] == b"chunk"]
    await system.client.redis.xdel(system.client.names.reply(rid), chunks[1])
    gateway = running_gateway(system.settings, system.config)
    async with gateway as url, httpx.AsyncClient(base_url=url) as http:
        # When a client resumes after the first chunk, and the second is gone
        r = await http.get(f"/v1/requests/{rid}", headers={**SSE, "Last-Event-ID": chunks[0].decode()})
        events = parse_sse(r.text)
        assert [e["event"] for e in events] == ["restart", "chunk", "end"], events
        text, end = after_last_restart(events)
        assert text == end["content"]
        # Resuming from the repair's own id gives just the end: nothing is shown twice
        again = await http.get(f"/v1/requests/{rid}", headers={**SSE, "Last-Event-ID": events[0]["id"]})
        assert [e["event"] for e in parse_sse(again.text)] == ["end"]


async def test_an_intact_stream_is_never_repaired(make_system) -> None:
    system: System = await make_system(replicas=1, start=False)
    rid = await written(system, PIECES, attempts=2, step_after=2)
    gateway = running_gateway(system.settings, system.config)
    async with gateway as url, httpx.AsyncClient(base_url=url) as http:
        whole = parse_sse((await http.get(f"/v1/requests/{rid}", headers=SSE)).text)
        ids = [e["id"] for e in whole]
        # read from every point of it, as a client resuming there would
        for i, resume_at in enumerate(ids[:-1]):
            r = await http.get(f"/v1/requests/{rid}", headers={**SSE, "Last-Event-ID": resume_at})
            assert [e["id"] for e in parse_sse(r.text)] == ids[i + 1 :], resume_at
    reasons = [json.loads(e["data"]).get("reason") for e in whole if e["event"] == "restart"]
    assert reasons == ["attempt"]
    text, end = after_last_restart(whole)
    assert text == end["content"]


async def test_every_entry_a_worker_writes_carries_the_chunk_count(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=200, reply_tokens=20)
    end = await system.client.ask("p", "count them")
    fields = [f for _id, f in await entries(system, end.request_id)]
    assert [f[b"t"] for f in fields][:1] == [b"start"] and CHUNK_COUNT not in fields[0]
    counts = [int(f[CHUNK_COUNT]) for f in fields[1:]]
    assert counts == [*range(1, len(counts)), len(counts) - 1], counts  # chunks 1..k, end k
    assert fields[-1][b"t"] == b"end"
