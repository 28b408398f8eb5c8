"""The OpenAI-compatible gateway, driven by the official ``openai`` SDK: chat completions (plain,
streamed, with client-side tools), threads, models, errors, and stateless stickiness."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from agentpool.shared.errors import Unavailable
from tests import api_helpers
from tests.api_helpers import Served
from tests.conftest import System, make_config

pytestmark = pytest.mark.timeout(45)

TENANT = "default"  # the tenant of make_config()'s pools
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = 'What is the weather like? @get_weather {"city": "Paris"}'


def _sdk(url: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", **options)


def serving(
    system: System, rpm: int | None = None
) -> contextlib.AbstractAsyncContextManager[Served[openai.AsyncOpenAI]]:
    return api_helpers.serving(system, TENANT, _sdk, rpm)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@dataclass
class Completion:
    """One answer, the same whether it came as one body or as chunks."""

    id: str
    content: str
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def as_message(self) -> dict[str, Any]:
        """The assistant message to send back in the history."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


async def complete(sdk: openai.AsyncOpenAI, stream: bool, **kw: Any) -> Completion:
    if not stream:
        done = await sdk.chat.completions.create(model="p", **kw)
        choice = done.choices[0]
        calls = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in choice.message.tool_calls or []
            if c.type == "function"
        ]
        return Completion(done.id, choice.message.content or "", choice.finish_reason, calls)
    ids, text, finish = set(), [], None
    calls_by_index: dict[int, dict[str, Any]] = {}
    async with await sdk.chat.completions.create(model="p", stream=True, **kw) as chunks:
        async for chunk in chunks:
            ids.add(chunk.id)
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                for d in choice.delta.tool_calls or []:
                    call = calls_by_index.setdefault(
                        d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                    call["id"] = d.id or call["id"]
                    if d.function is not None:
                        call["function"]["name"] += d.function.name or ""
                        call["function"]["arguments"] += d.function.arguments or ""
                finish = choice.finish_reason or finish
    assert len(ids) == 1, ids  # every chunk names the one request
    return Completion(ids.pop(), "".join(text), finish, [calls_by_index[i] for i in sorted(calls_by_index)])


async def test_plain_completion_is_the_agentpool_request(make_system) -> None:
    system: System = await make_system(replicas=2)
    async with serving(system) as s:
        raw = await s.sdk.chat.completions.with_raw_response.create(
            model="p", messages=[user("hello there agent")]
        )
        done = raw.parse()
        assert done.object == "chat.completion" and done.model == "p"
        assert len(done.choices) == 1
        choice = done.choices[0]
        assert choice.finish_reason == "stop" and choice.message.role == "assistant"
        assert choice.message.content is not None
        assert choice.message.content.startswith("[0 earlier] Re: hello there agent —")
        assert done.usage is not None
        assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens == 12  # reply_tokens
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        # the id is agentpool's request id: GET /v1/requests/{id} answers the same request
        record = await s.record(done.id)
        assert record["request_id"] == done.id and record["content"] == choice.message.content
        assert record["agent_id"] in system.workers
        assert record["usage"].get("output_tokens", 0) == done.usage.completion_tokens
        assert record["usage"].get("input_tokens", 0) == done.usage.prompt_tokens
        assert raw.headers["x-request-id"] == done.id
        assert raw.headers["x-agent-id"] == record["agent_id"]
        assert raw.headers["x-routing-tier"] == "sticky"
        assert "x-thread-id" not in raw.headers  # stateless: no thread used


async def test_stream_chunks_make_the_whole_reply_then_finish_then_usage(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=500, reply_tokens=20)
    async with serving(system) as s:
        stream = await s.sdk.chat.completions.create(
            model="p",
            messages=[user("stream me please")],
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            chunks = [c async for c in stream]
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert {c.model for c in chunks} == {"p"}
        assert len({c.id for c in chunks}) == 1
        rid = chunks[0].id
        # Then: role first, content deltas, one finish chunk, and a last chunk of usage only
        assert chunks[0].choices[0].delta.role == "assistant"
        *body, finish, tail = chunks
        assert tail.choices == [] and tail.usage is not None
        assert len(finish.choices) == 1 and finish.choices[0].finish_reason == "stop"
        assert all(c.usage is None for c in chunks[:-1])
        assert all(len(c.choices) == 1 and c.choices[0].finish_reason is None for c in body)
        pieces = [c.choices[0].delta.content for c in body if c.choices[0].delta.content]
        assert len(pieces) >= 10, pieces  # streamed, not one lump
        record = await s.record(rid)
        assert "".join(pieces) + (finish.choices[0].delta.content or "") == record["content"]
        assert record["content"].startswith("[0 earlier] Re: stream me please —")
        assert tail.usage.completion_tokens == 20
        assert tail.usage.total_tokens == tail.usage.prompt_tokens + tail.usage.completion_tokens
        assert tail.usage.prompt_tokens == record["usage"].get("input_tokens", 0) > 0


async def test_models_lists_and_retrieves_the_keys_pools(make_system) -> None:
    extra = "".join(
        f'\n[pools.{name}]\ntenant = "{tenant}"\n[[pools.{name}.deployments]]\n'
        f'name = "main"\nagent_type = "echo"\nreplicas = 1\n'
        for name, tenant in (("q", TENANT), ("theirs", "other"))
    )
    system: System = await make_system(config=make_config(replicas=1, extra=extra))
    async with serving(system) as s:
        listed = await s.sdk.models.list()
        # Then the key's tenant sees its two pools, not the other tenant's
        assert sorted(m.id for m in listed.data) == ["p", "q"]
        assert all(m.object == "model" and m.owned_by == "agentpool" for m in listed.data)
        assert all(isinstance(m.created, int) for m in listed.data)
        one = await s.sdk.models.retrieve("p")
        assert (one.id, one.object, one.owned_by) == ("p", "model", "agentpool")
        for missing in ("nope", "theirs"):  # another tenant's pool looks like no pool
            with pytest.raises(openai.NotFoundError) as e:
                await s.sdk.models.retrieve(missing)
            assert e.value.status_code == 404


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("thread", [None, "weather-thread"], ids=["stateless", "thread"])
async def test_client_side_tool_round_trip(make_system, stream: bool, thread: str | None) -> None:
    system: System = await make_system(replicas=2)
    via: dict[str, Any] = {"extra_headers": {"X-Thread-ID": thread}} if thread else {}
    async with serving(system) as s:
        # When the user's message asks for the offered tool
        history = [user(ASK_WEATHER)]
        first = await complete(s.sdk, stream, messages=history, tools=[WEATHER], **via)
        # Then the model calls it, and the client is the one to run it
        assert first.finish_reason == "tool_calls", first
        assert len(first.tool_calls) == 1
        call = first.tool_calls[0]
        assert call["id"] and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        # When the client sends the whole history with the call and its result
        history += [first.as_message(), {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
        second = await complete(s.sdk, stream, messages=history, tools=[WEATHER], **via)
        # Then the answer quotes the result
        assert second.finish_reason == "stop", second
        assert "get_weather returned: sunny" in second.content and not second.tool_calls
        for rid in (first.id, second.id):
            record = await s.record(rid)
            if thread:
                assert record["thread_id"] == thread
        assert record["content"] == second.content


@pytest.mark.parametrize("how", ["header", "metadata"])
async def test_a_thread_keeps_earlier_turns(make_system, how: str) -> None:
    system: System = await make_system(replicas=2)
    tid = f"conv-{how}"
    via: dict[str, Any] = (
        {"extra_headers": {"X-Thread-ID": tid}} if how == "header" else {"metadata": {"thread_id": tid}}
    )
    async with serving(system) as s:

        async def turn(messages: list[dict[str, Any]]) -> tuple[str, str]:
            raw = await s.sdk.chat.completions.with_raw_response.create(model="p", messages=messages, **via)
            done = raw.parse()
            assert raw.headers["x-thread-id"] == tid
            assert (await s.record(done.id))["thread_id"] == tid
            return done.id, done.choices[0].message.content or ""

        # Given two full turns in the thread, the client sending the whole history
        _, one = await turn([user("first question here")])
        assert one.startswith("[0 earlier] Re: first question here")
        history = [user("first question here"), {"role": "assistant", "content": one}]
        _, two = await turn([*history, user("second question here")])
        assert two.startswith("[2 earlier] Re: second question here")
        # When a third call sends only the new user message
        _, three = await turn([user("third question here")])
        # Then the model still sees the four earlier messages
        assert three.startswith("[4 earlier] Re: third question here"), three
        # while the same message without a thread is a conversation of its own
        alone = await s.sdk.chat.completions.create(model="p", messages=[user("third question here")])
        assert (alone.choices[0].message.content or "").startswith("[0 earlier]")


async def test_the_documented_body_fields_are_accepted(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with serving(system) as s:
        done = await s.sdk.chat.completions.create(
            model="p",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Answer in English."},
                user(ASK_WEATHER),
            ],
            temperature=0.5,
            top_p=0.9,
            user="user-1",
            metadata={"purpose": "test"},
            tools=[WEATHER],
            tool_choice="none",
            parallel_tool_calls=False,
        )
        # system/developer messages are instructions, not turns; tool_choice "none" calls nothing
        choice = done.choices[0]
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert (choice.message.content or "").startswith("[0 earlier] Re: What is the weather")


async def test_unknown_model_bad_key_and_bad_bodies_are_sdk_errors(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with serving(system) as s:
        ask = [user("hi")]
        with pytest.raises(openai.NotFoundError) as missing:
            await s.sdk.chat.completions.create(model="nope", messages=ask)
        assert missing.value.status_code == 404 and missing.value.code == "POOL_NOT_FOUND"
        assert "nope" in missing.value.message

        wrong = s.sdk_with(api_key="sk-wrong")
        try:
            with pytest.raises(openai.AuthenticationError) as denied:
                await wrong.chat.completions.create(model="p", messages=ask)
            assert denied.value.status_code == 401
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        finally:
            await wrong.close()

        with pytest.raises(openai.BadRequestError) as n2:
            await s.sdk.chat.completions.create(model="p", messages=ask, n=2)
        assert n2.value.status_code == 400 and n2.value.type == "invalid_request_error"
        assert n2.value.param == "n" and re.search(r"\bn\b", n2.value.message), n2.value.message

        for name in ("max_tokens", "max_completion_tokens"):  # the echo type allows 1024
            with pytest.raises(openai.BadRequestError) as big:
                await s.sdk.chat.completions.create(model="p", messages=ask, **{name: 5000})
            assert big.value.type == "invalid_request_error" and big.value.param in (name, "max_tokens")
            assert "5000" in big.value.message and "1024" in big.value.message, big.value.message

        with pytest.raises(openai.BadRequestError) as unknown:
            await s.sdk.chat.completions.create(model="p", messages=ask, extra_body={"colour": "red"})
        assert "colour" in unknown.value.message, unknown.value.message

        # A max_tokens within the limit cuts the reply short, and the gateway still answers normally
        short = await s.sdk.chat.completions.create(model="p", messages=ask, max_tokens=5)
        assert short.choices[0].finish_reason == "length"
        assert short.usage is not None and short.usage.completion_tokens == 5
        ok = await s.sdk.chat.completions.create(model="p", messages=ask)
        assert ok.choices[0].finish_reason == "stop"


async def test_a_saturated_pool_is_retried_then_raises(make_system) -> None:
    # Given one replica holding one request "forever" and one queued: the pool is full
    system: System = await make_system(
        replicas=1,
        concurrency=1,
        sticky_depth=1,
        max_depth=2,
        ttft_ms=60_000,
        rescue_after_s=120,
        drain_timeout_s=1,
    )
    subs = []
    for i in range(10):
        try:
            sub, _ = await system.client.submit_subscribed("p", f"hold {i}", thread_id=f"hold-{i}")
        except Unavailable:
            break
        subs.append(sub)
    assert len(subs) == 2
    attempts: list[httpx.Response] = []

    async def seen(response: httpx.Response) -> None:
        attempts.append(response)

    try:
        async with (
            serving(system) as s,
            httpx.AsyncClient(event_hooks={"response": [seen]}, timeout=20) as counted,
        ):
            sdk = s.sdk_with(max_retries=2, http_client=counted)
            # When a client asks through the SDK, which retries 503s
            with pytest.raises(openai.InternalServerError) as e:
                await sdk.chat.completions.create(model="p", messages=[user("one more")])
            # Then it tried three times, each answered 503 with Retry-After, and gave up
            assert e.value.status_code == 503 and e.value.code == "POOL_SATURATED"
            assert [r.status_code for r in attempts] == [503, 503, 503]
            assert all(r.url.path == "/v1/chat/completions" for r in attempts)
            assert all(int(r.headers["retry-after"]) >= 1 for r in attempts)
    finally:
        for sub in subs:
            sub.close()


async def test_rate_limited_key_gets_rate_limit_error(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with serving(system, rpm=1) as s:
        first = await s.sdk.chat.completions.create(model="p", messages=[user("hi")])
        assert first.choices[0].finish_reason == "stop"
        # max_retries=0: the SDK would otherwise honour the minute-long Retry-After
        with pytest.raises(openai.RateLimitError) as e:
            await s.sdk.chat.completions.create(model="p", messages=[user("again")])
        assert e.value.status_code == 429 and e.value.code == "RATE_LIMIT_EXCEEDED"
        assert int(e.value.response.headers["retry-after"]) >= 1


CONVERSATIONS, TURNS, AT_ONCE = 100, 5, 16


async def test_stateless_conversations_stay_on_one_replica(make_system) -> None:
    # Room for every conversation in flight on one replica: nothing needs to spill
    system: System = await make_system(replicas=3, concurrency=16, sticky_depth=32, max_depth=64)
    gate = asyncio.Semaphore(AT_ONCE)
    async with serving(system, rpm=10_000) as s:

        async def conversation(i: int) -> list[str]:
            history: list[dict[str, Any]] = []
            agents = []
            async with gate:
                for t in range(TURNS):
                    history.append(user(f"conversation {i} turn {t}"))
                    raw = await s.sdk.chat.completions.with_raw_response.create(model="p", messages=history)
                    content = raw.parse().choices[0].message.content or ""
                    assert content.startswith(f"[{2 * t} earlier] Re: conversation {i} turn {t}"), content
                    agents.append(raw.headers["x-agent-id"])
                    history.append({"role": "assistant", "content": content})
            return agents

        # When 100 conversations of 5 turns each send their whole history and no thread id
        served = await asyncio.gather(*(conversation(i) for i in range(CONVERSATIONS)))
    # Then each conversation is answered by one replica, and the conversations use all three
    on_one = sum(len(set(agents)) == 1 for agents in served) / CONVERSATIONS
    calls_on_main = sum(collections.Counter(a).most_common(1)[0][1] for a in served) / (CONVERSATIONS * TURNS)
    spread = collections.Counter(agents[0] for agents in served)
    print(
        f"\nstateless stickiness: {on_one:.1%} of {CONVERSATIONS} conversations on one replica, "
        f"{calls_on_main:.1%} of {CONVERSATIONS * TURNS} calls on the conversation's replica; "
        f"first turns per replica {dict(sorted(spread.items()))}"
    )
    assert on_one >= 0.99
    assert set(spread) == set(system.workers)
