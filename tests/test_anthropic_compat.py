"""The Anthropic-compatible gateway, driven by the official ``anthropic`` SDK: messages (plain,
streamed, with client-side tools), system prompts, threads, models, and errors as SDK exceptions."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import anthropic
import httpx2  # the anthropic SDK's HTTP client: it refuses an httpx one
import pytest
from anthropic.types import Message

from agentpool.shared.errors import Unavailable
from tests import api_helpers
from tests.api_helpers import Served
from tests.conftest import System, make_config

pytestmark = pytest.mark.timeout(30)

TENANT = "default"  # the tenant of make_config()'s pools
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK_WEATHER = 'What is the weather like? @get_weather {"city": "Paris"}'


def _sdk(url: str, **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, **options)


def serving(
    system: System, rpm: int | None = None
) -> contextlib.AbstractAsyncContextManager[Served[anthropic.AsyncAnthropic]]:
    return api_helpers.serving(system, TENANT, _sdk, rpm)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


async def answer(sdk: anthropic.AsyncAnthropic, stream: bool, **kw: Any) -> tuple[Message, set[str]]:
    """One message, from ``messages.create`` or accumulated by ``messages.stream``, and the kinds
    of content block deltas that carried it (none without a stream)."""
    if not stream:
        return await sdk.messages.create(model="p", max_tokens=256, **kw), set()
    deltas: set[str] = set()
    async with sdk.messages.stream(model="p", max_tokens=256, **kw) as s:
        async for event in s:
            if event.type == "content_block_delta":
                deltas.add(event.delta.type)
        return await s.get_final_message(), deltas


async def test_create_answers_with_a_text_block_and_is_the_agentpool_request(make_system) -> None:
    system: System = await make_system(replicas=2)
    async with serving(system) as s:
        raw = await s.sdk.messages.with_raw_response.create(
            model="p", max_tokens=256, messages=[user("hello there agent")]
        )
        done = await raw.parse()
        assert (done.type, done.role, done.model) == ("message", "assistant", "p")
        assert [b.type for b in done.content] == ["text"]
        assert text_of(done).startswith("[0 earlier] Re: hello there agent —")
        assert done.stop_reason == "end_turn"
        assert done.usage.input_tokens > 0 and done.usage.output_tokens == 12  # reply_tokens
        # the id is agentpool's request id: GET /v1/requests/{id} answers the same request
        record = await s.record(done.id)
        assert record["request_id"] == done.id and record["content"] == text_of(done)
        assert record["agent_id"] in system.workers
        assert record["usage"].get("output_tokens", 0) == done.usage.output_tokens
        assert record["usage"].get("input_tokens", 0) == done.usage.input_tokens
        assert raw.headers["x-request-id"] == done.id
        assert raw.headers["x-agent-id"] == record["agent_id"]


async def test_system_prompt_as_a_string_or_as_text_blocks(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with serving(system) as s:
        ask = [user("who are you")]
        bare = await s.sdk.messages.create(model="p", max_tokens=256, messages=ask)
        # When the same system prompt comes as a string and as one text block
        as_string = await s.sdk.messages.create(
            model="p", max_tokens=256, messages=ask, system="Answer like Ada."
        )
        as_blocks = await s.sdk.messages.create(
            model="p",
            max_tokens=256,
            messages=ask,
            system=[{"type": "text", "text": "Answer like Ada."}],
        )
        # Then the model sees the same prompt either way, and not the prompt it had without it
        assert text_of(as_string) == text_of(as_blocks)
        assert as_string.usage.input_tokens == as_blocks.usage.input_tokens
        assert as_string.usage.input_tokens != bare.usage.input_tokens
        assert text_of(as_string) != text_of(bare)  # the fake model's words hash the system prompt
        for done in (bare, as_string, as_blocks):
            assert done.stop_reason == "end_turn"
            assert text_of(done).startswith("[0 earlier] Re: who are you —")


async def test_stream_text_pieces_make_the_whole_reply(make_system) -> None:
    system: System = await make_system(replicas=1, tokens_per_s=500, reply_tokens=20)
    async with serving(system) as s:
        async with s.sdk.messages.stream(
            model="p", max_tokens=256, messages=[user("stream me please")]
        ) as stream:
            pieces = [piece async for piece in stream.text_stream]
            final = await stream.get_final_message()
        assert len(pieces) > 1, pieces  # streamed, not one lump
        assert "".join(pieces) == text_of(final)
        assert text_of(final).startswith("[0 earlier] Re: stream me please —")
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 20
        record = await s.record(final.id)
        assert record["content"] == "".join(pieces)
        assert record["usage"].get("output_tokens", 0) == final.usage.output_tokens

        # The raw events come in the Messages API order
        events = await s.sdk.messages.create(
            model="p", max_tokens=256, messages=[user("raw events please")], stream=True
        )
        async with events:
            kinds = [e async for e in events]
        types = [e.type for e in kinds]
        assert types[:2] == ["message_start", "content_block_start"]
        assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert set(types[2:-3]) == {"content_block_delta"}
        deltas = [e.delta for e in kinds if e.type == "content_block_delta"]
        assert all(d.type == "text_delta" for d in deltas)
        start, delta = kinds[0], kinds[-2]
        assert start.type == "message_start" and delta.type == "message_delta"
        assert start.message.model == "p" and start.message.role == "assistant"
        assert delta.delta.stop_reason == "end_turn" and delta.usage.output_tokens == 20
        raw_text = "".join(d.text for d in deltas if d.type == "text_delta")
        assert raw_text == (await s.record(start.message.id))["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("thread", [None, "weather-thread"], ids=["stateless", "thread"])
async def test_client_side_tool_round_trip(make_system, stream: bool, thread: str | None) -> None:
    system: System = await make_system(replicas=1)
    via: dict[str, Any] = {"extra_headers": {"X-Thread-ID": thread}} if thread else {}
    async with serving(system) as s:
        # When the user's message asks for the offered tool
        history: list[dict[str, Any]] = [user(ASK_WEATHER)]
        first, deltas = await answer(s.sdk, stream, messages=history, tools=[WEATHER], **via)
        # Then the model calls it, and the client is the one to run it
        assert first.stop_reason == "tool_use", first
        calls = [b for b in first.content if b.type == "tool_use"]
        assert len(calls) == 1
        call = calls[0]
        assert call.id and call.name == "get_weather" and call.input == {"city": "Paris"}
        if stream:  # the arguments arrive as JSON deltas
            assert deltas == {"input_json_delta"}, deltas
        # When the client sends the history, the assistant's content and the tool's result
        history += [
            {"role": "assistant", "content": first.content},
            user([{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]),
        ]
        second, deltas = await answer(s.sdk, stream, messages=history, tools=[WEATHER], **via)
        # Then the answer quotes the result
        assert second.stop_reason == "end_turn", second
        assert "get_weather returned: sunny" in text_of(second)
        assert not [b for b in second.content if b.type == "tool_use"]
        if stream:
            assert deltas == {"text_delta"}, deltas
        for done in (first, second):
            record = await s.record(done.id)
            if thread:
                assert record["thread_id"] == thread
        assert record["content"] == text_of(second)


async def test_a_thread_keeps_earlier_turns(make_system) -> None:
    system: System = await make_system(replicas=2)
    tid = "conv-anthropic"
    async with serving(system) as s:

        async def turn(text: str) -> str:
            raw = await s.sdk.messages.with_raw_response.create(
                model="p", max_tokens=256, messages=[user(text)], extra_headers={"X-Thread-ID": tid}
            )
            done = await raw.parse()
            assert raw.headers["x-thread-id"] == tid
            assert (await s.record(done.id))["thread_id"] == tid
            return text_of(done)

        # Given a thread where each call sends only the new user message
        one = await turn("first question here")
        assert one.startswith("[0 earlier] Re: first question here"), one
        two = await turn("second question here")
        assert two.startswith("[2 earlier] Re: second question here"), two
        # Then the model still sees every earlier turn
        three = await turn("third question here")
        assert three.startswith("[4 earlier] Re: third question here"), three

        # while without a thread the messages sent are the whole conversation
        history = [user("first question here"), {"role": "assistant", "content": one}]
        full = await s.sdk.messages.create(
            model="p", max_tokens=256, messages=[*history, user("second question here")]
        )
        assert text_of(full).startswith("[2 earlier] Re: second question here"), text_of(full)
        alone = await s.sdk.messages.create(model="p", max_tokens=256, messages=[user("third question here")])
        assert text_of(alone).startswith("[0 earlier] Re: third question here"), text_of(alone)


async def test_models_list_in_anthropic_shape(make_system) -> None:
    extra = "".join(
        f'\n[pools.{name}]\ntenant = "{tenant}"\n[[pools.{name}.deployments]]\n'
        f'name = "main"\nagent_type = "echo"\nreplicas = 1\n'
        for name, tenant in (("q", TENANT), ("theirs", "other"))
    )
    system: System = await make_system(config=make_config(replicas=1, extra=extra))
    async with serving(system) as s:
        # When the SDK (which sends anthropic-version) lists the models
        listed = [m async for m in s.sdk.models.list()]
        # Then it gets the key's tenant's pools, in Anthropic's shape, not the other tenant's
        assert sorted(m.id for m in listed) == ["p", "q"]
        assert all(m.type == "model" and m.display_name for m in listed)
        assert all(isinstance(m.created_at, datetime) for m in listed)
        page = await s.http.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["has_more"] is False
        assert (body["first_id"], body["last_id"]) == (body["data"][0]["id"], body["data"][-1]["id"])
        one = await s.sdk.models.retrieve("p")
        assert (one.id, one.type) == ("p", "model")
        for missing in ("nope", "theirs"):  # another tenant's pool looks like no pool
            with pytest.raises(anthropic.NotFoundError) as e:
                await s.sdk.models.retrieve(missing)
            assert e.value.status_code == 404


async def test_unknown_model_bad_key_and_bad_bodies_are_sdk_errors(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with serving(system) as s:
        ask = [user("hi")]
        with pytest.raises(anthropic.NotFoundError) as missing:
            await s.sdk.messages.create(model="nope", max_tokens=256, messages=ask)
        assert missing.value.status_code == 404 and missing.value.type == "not_found_error"
        assert isinstance(missing.value.body, dict) and missing.value.body["type"] == "error"

        wrong = s.sdk_with(api_key="sk-wrong")
        try:
            with pytest.raises(anthropic.AuthenticationError) as denied:
                await wrong.messages.create(model="p", max_tokens=256, messages=ask)
            assert denied.value.status_code == 401 and denied.value.type == "authentication_error"
        finally:
            await wrong.close()

        # The echo type allows 1024 tokens; and stop sequences are not supported
        for bad in ({"max_tokens": 4096}, {"max_tokens": 256, "stop_sequences": ["STOP"]}):
            with pytest.raises(anthropic.BadRequestError) as refused:
                await s.sdk.messages.create(model="p", messages=ask, **bad)
            assert refused.value.status_code == 400, bad
            assert refused.value.type == "invalid_request_error", (bad, refused.value.body)

        # A max_tokens within the limit cuts the reply short, and the gateway still answers normally
        short = await s.sdk.messages.create(model="p", max_tokens=5, messages=ask)
        assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 5
        ok = await s.sdk.messages.create(model="p", max_tokens=256, messages=ask)
        assert ok.stop_reason == "end_turn"


async def test_a_saturated_pool_is_retried_then_raises(make_system) -> None:
    system: System = await make_system(
        replicas=1,
        concurrency=1,
        sticky_depth=1,
        max_depth=2,
        ttft_ms=60_000,
        rescue_after_s=120,
        drain_timeout_s=1,
    )
    # Given the one replica busy with a request that takes a minute to its first token
    sub, ticket = await system.client.submit_subscribed("p", "hold", thread_id="hold")
    held = system.client.stream_raw(ticket, sub=sub)
    queued = []
    try:
        _, kind, _ = await anext(held)
        assert kind == b"start"
        # and its queue filled until the pool refuses more
        for i in range(5):
            try:
                queued.append((await system.client.submit_subscribed("p", f"wait {i}", thread_id=f"w{i}"))[0])
            except Unavailable as e:
                assert e.error_code == "POOL_SATURATED"
                break
        else:
            raise AssertionError("the pool never filled up")
        attempts: list[httpx2.Response] = []

        async def seen(response: httpx2.Response) -> None:
            attempts.append(response)

        async with (
            serving(system) as s,
            httpx2.AsyncClient(event_hooks={"response": [seen]}, timeout=20) as counted,
        ):
            sdk = s.sdk_with(max_retries=2, http_client=counted)
            # When a client asks through the SDK, which retries 503s
            with pytest.raises(anthropic.InternalServerError) as e:
                await sdk.messages.create(model="p", max_tokens=256, messages=[user("one more")])
            # Then it tried three times, each answered 503 with Retry-After, and gave up
            assert e.value.status_code == 503 and e.value.type == "overloaded_error"
            assert [r.status_code for r in attempts] == [503, 503, 503]
            assert all(r.url.path == "/v1/messages" for r in attempts)
            assert all(int(r.headers["retry-after"]) >= 1 for r in attempts)
    finally:
        for q in queued:
            q.close()
        await held.aclose()


async def test_rate_limited_key_gets_rate_limit_error(make_system) -> None:
    system: System = await make_system(replicas=1)
    async with serving(system, rpm=1) as s:
        first = await s.sdk.messages.create(model="p", max_tokens=256, messages=[user("hi")])
        assert first.stop_reason == "end_turn"
        # max_retries=0: the SDK would otherwise honour the minute-long Retry-After
        with pytest.raises(anthropic.RateLimitError) as e:
            await s.sdk.messages.create(model="p", max_tokens=256, messages=[user("again")])
        assert e.value.status_code == 429 and e.value.type == "rate_limit_error"
        assert int(e.value.response.headers["retry-after"]) >= 1
