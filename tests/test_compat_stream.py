"""A translated stream (OpenAI/Anthropic SSE) never contradicts its final answer.

A run that restarts on another replica cannot take back the text it streamed: the new attempt's
text must repeat it (it is skipped), or the stream ends with an error. Text the stream missed is
sent before the end. Fed with the reply-stream entries a worker writes (``event_fields``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from agentpool.gateway import anthropic_compat, compat, openai_compat
from agentpool.shared.messages import Chunk, End, Event, Restart, Start, Timings, Usage, event_fields

pytestmark = pytest.mark.timeout(10)


def _end(content: str) -> End:
    return End(
        request_id="r1",
        thread_id="t1",
        agent_id="a2",
        content=content,
        usage=Usage(3, 4),
        timings=Timings(),
        created_at=1.0,
    )


async def _entries(events: list[Event]) -> AsyncIterator[tuple[bytes, bytes, bytes]]:
    for i, e in enumerate(events):
        f = event_fields(e)
        yield f"{i}-0".encode(), f[b"t"], f[b"d"]


async def _openai(events: list[Event]) -> tuple[str, list[dict[str, object]], bool]:
    abandoned = []
    writer = openai_compat.ChunkWriter("r1", "p", 1, include_usage=True)
    out = b"".join(
        [b async for b in compat.translated(_entries(events), writer, lambda: abandoned.append(1))]
    )
    datas = [line[6:] for line in out.decode().split("\n") if line.startswith("data: ")]
    assert datas[-1] == "[DONE]" or "error" in json.loads(datas[-1])
    objs = [json.loads(d) for d in datas if d != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in objs if c.get("choices"))
    return text, objs, bool(abandoned)


async def test_a_restart_that_repeats_the_text_streams_it_once() -> None:
    events: list[Event] = [
        Start(request_id="r1", agent_id="a1"),
        Chunk(text="Hel"),
        Chunk(text="lo"),
        Restart(attempt=2, agent_id="a2"),
        Start(request_id="r1", agent_id="a2", attempt=2),
        Chunk(text="He", attempt=2),
        Chunk(text="llo wo", attempt=2),
        Chunk(text="rld", attempt=2),
        _end("Hello world"),
    ]
    text, objs, abandoned = await _openai(events)
    assert text == "Hello world" and not abandoned
    assert objs[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_a_restart_that_says_something_else_ends_with_an_error() -> None:
    events: list[Event] = [
        Chunk(text="Hello"),
        Restart(attempt=2, agent_id="a2"),
        Chunk(text="Goodbye", attempt=2),
        _end("Goodbye"),
    ]
    text, objs, abandoned = await _openai(events)
    assert text == "Hello"
    assert objs[-1]["error"]["code"] == "RESTART_DIVERGED"  # type: ignore[index]
    assert abandoned  # the run is cancelled: nobody reads its answer


async def test_text_the_stream_missed_comes_before_the_end() -> None:
    text, _, _ = await _openai([Chunk(text="Hello"), _end("Hello world")])
    assert text == "Hello world"


async def test_the_anthropic_stream_follows_the_same_rule() -> None:
    writer = anthropic_compat.EventWriter("r1", "p")
    events: list[Event] = [
        Chunk(text="Hi"),
        Restart(attempt=2, agent_id="a2"),
        Chunk(text="Hi there"),
        _end("Hi there"),
    ]
    out = b"".join([b async for b in compat.translated(_entries(events), writer, lambda: None)]).decode()
    deltas = [
        json.loads(line[6:])["delta"]["text"]
        for line in out.split("\n")
        if line.startswith("data: ") and '"text_delta"' in line
    ]
    assert "".join(deltas) == "Hi there"
    assert out.rstrip().endswith('data: {"type":"message_stop"}')
