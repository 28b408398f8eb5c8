"""Tool calling through every model back end: the real SDKs against the fake LLM server, and the
in-process ``fake`` provider, all answering with :mod:`agentpool.shared.fake_model`.

A ``@name {json}`` marker in the user's message makes the fake model call tool ``name``; given the
results it quotes them; a marker inside a result chains another call. The fake server also answers
plain HTTP, so the non-streaming JSON of both APIs is checked as the SDKs would receive it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from agentpool.fake_llm import FakeLLMSettings, Running, running
from agentpool.shared.fake_model import TOKEN, fake_tokens, markers, respond
from agentpool.shared.messages import RAW_ARGUMENTS_KEY, Message, ToolCall, parse_arguments
from agentpool.workers.providers.base import Prompt, Provider, Reply, ToolSpec
from agentpool.workers.providers.retry import generate_with_retries
from tests.conftest import FAKE_KEY_ENV

KEY = "sk-fake-tools"
KEY_ENV = FAKE_KEY_ENV
REPLY_TOKENS = 12
SYSTEM = "You use tools."
SDK_KINDS = ["openai", "anthropic"]
ALL_KINDS = [*SDK_KINDS, "fake"]
ID_PREFIX = {"openai": "call_", "anthropic": "toolu_", "fake": "call_"}
WORD = {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}
LOOKUP = ToolSpec(name="lookup", description="Look a word up.", parameters=WORD)
LOOP = ToolSpec(name="loop", description="Go round again.")
TOOLS = [LOOKUP, LOOP]
MakeProvider = Callable[..., Provider]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fake_llm() -> AsyncIterator[Running]:
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=REPLY_TOKENS)) as srv:
        yield srv


async def ask(
    provider: Provider, messages: list[Message], tools: list[ToolSpec] = TOOLS
) -> tuple[Reply, str]:
    """One model call: the reply and the text that streamed."""
    chunks: list[str] = []
    reply = await provider.generate(Prompt(system=SYSTEM, messages=messages, tools=tools), chunks.append)
    return reply, "".join(chunks)


def answered(messages: list[Message], reply: Reply, *results: str) -> list[Message]:
    """The conversation after the model's tool calls and their results (in order)."""
    calls = reply.tool_calls
    assert len(calls) == len(results)
    tool_messages = [
        Message("tool", content, tool_call_id=c.id, name=c.name)
        for c, content in zip(calls, results, strict=True)
    ]
    return [*messages, Message("assistant", reply.text, tool_calls=calls), *tool_messages]


async def last_body(control: httpx.AsyncClient, api: str) -> dict[str, Any]:
    response = await control.get("/_fake/stats")
    response.raise_for_status()
    body: dict[str, Any] = response.json()["bodies"][api][-1]
    return body


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_a_marker_makes_the_model_call_the_tool(make_provider: MakeProvider, kind: str) -> None:
    messages = [Message("user", 'what is @lookup {"word": "pool"} please')]

    reply, streamed = await ask(make_provider(kind), messages)

    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("lookup", {"word": "pool"})]
    assert reply.tool_calls[0].id.startswith(ID_PREFIX[kind])
    assert reply.stop_reason == "tool_calls"
    assert reply.text == streamed == ""
    assert reply.usage.output_tokens == 1 and reply.usage.input_tokens > 0


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_two_markers_are_two_calls_in_one_turn(make_provider: MakeProvider, kind: str) -> None:
    messages = [Message("user", '@lookup {"word": "pool"} and @loop {} and @lookup {"word": "warm \\u00e9"}')]

    reply, _ = await ask(make_provider(kind), messages)

    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("lookup", {"word": "pool"}),
        ("loop", {}),
        ("lookup", {"word": "warm é"}),  # arguments streamed in fragments, put back together
    ]
    assert len({c.id for c in reply.tool_calls}) == 3


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_given_the_results_the_model_answers_with_them_verbatim(
    make_provider: MakeProvider, kind: str
) -> None:
    # Given an earlier turn and a model turn that called two tools
    provider = make_provider(kind)
    messages = [
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", '@lookup {"word": "pool"} @lookup {"word": "replica"}'),
    ]
    calls, _ = await ask(provider, messages)
    long_result = " ".join(f"word{i}" for i in range(3 * REPLY_TOKENS))  # longer than a reply

    # When the results go back
    reply, streamed = await ask(provider, answered(messages, calls, "a set of warm agents", long_result))

    # Then the answer quotes each of them whole, streamed in pieces
    assert (
        reply.text
        == streamed
        == f"[2 earlier] lookup returned: a set of warm agents; lookup returned: {long_result}"
    )
    assert reply.tool_calls == [] and reply.stop_reason == "end"
    assert reply.usage.output_tokens == len(TOKEN.findall(reply.text)) > REPLY_TOKENS


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_a_marker_in_a_result_chains_another_call(make_provider: MakeProvider, kind: str) -> None:
    provider = make_provider(kind)
    messages = [Message("user", "@loop {}")]
    first, _ = await ask(provider, messages)

    messages = answered(messages, first, "again: @loop {}")
    second, _ = await ask(provider, messages)
    messages = answered(messages, second, 'now @lookup {"word": "end"}')
    third, _ = await ask(provider, messages)
    done, _ = await ask(provider, answered(messages, third, "the end"))

    assert [c.name for c in first.tool_calls + second.tool_calls + third.tool_calls] == [
        "loop",
        "loop",
        "lookup",
    ]
    assert third.tool_calls[0].arguments == {"word": "end"}
    assert len({first.tool_calls[0].id, second.tool_calls[0].id}) == 2  # each round its own id
    assert done.text == "[0 earlier] lookup returned: the end"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(
    "content", ["@nosuch {}", '@lookup {"word": oops}', "@lookup [1]", "mail me@lookup.org"]
)
async def test_a_marker_for_no_offered_tool_is_plain_text(
    make_provider: MakeProvider, kind: str, content: str
) -> None:
    messages = [Message("user", content)]

    reply, streamed = await ask(make_provider(kind), messages)

    assert reply.tool_calls == [] and reply.stop_reason == "end"
    assert streamed == reply.text == "".join(fake_tokens(SYSTEM, messages, REPLY_TOKENS))


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_no_tools_offered_means_no_calls(make_provider: MakeProvider, kind: str) -> None:
    reply, _ = await ask(make_provider(kind), [Message("user", "@lookup {}")], tools=[])

    assert reply.tool_calls == [] and reply.text.startswith("[0 earlier] Re: @lookup {}")


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_max_tokens_cuts_an_answer_quoting_results(make_provider: MakeProvider, kind: str) -> None:
    provider = make_provider(kind, max_tokens=5)
    messages = [Message("user", '@lookup {"word": "pool"}')]
    calls, _ = await ask(provider, messages)

    reply, _ = await ask(provider, answered(messages, calls, "one two three four five"))

    assert reply.text == "[0 earlier] lookup returned: one "
    assert reply.stop_reason == "max_tokens"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
async def test_openai_history_with_tool_steps_is_sent_in_its_format(
    make_provider: MakeProvider, control: httpx.AsyncClient
) -> None:
    # Given a turn in which the model called two tools, one failing and one with broken arguments
    calls = [
        ToolCall(id="call_a", name="lookup", arguments={"word": "pool"}),
        ToolCall(id="call_b", name="loop", arguments={RAW_ARGUMENTS_KEY: "{oops"}),
    ]
    messages = [
        Message("user", "@lookup {} @loop {}"),
        Message("assistant", "", tool_calls=calls),
        Message("tool", "warm agents", tool_call_id="call_a", name="lookup"),
        Message("tool", "loop broke", tool_call_id="call_b", name="loop", is_error=True),
    ]

    # When the provider sends it
    reply, _ = await ask(make_provider("openai"), messages)

    # Then the server got OpenAI's tool messages and function tools
    body = await last_body(control, "openai")
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "@lookup {} @loop {}"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"word":"pool"}'},
                },
                {"id": "call_b", "type": "function", "function": {"name": "loop", "arguments": "{oops"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "warm agents"},
        {"role": "tool", "tool_call_id": "call_b", "content": "loop broke"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": WORD, "description": "Look a word up."},
        },
        {
            "type": "function",
            "function": {
                "name": "loop",
                "parameters": {"type": "object", "properties": {}},
                "description": "Go round again.",
            },
        },
    ]
    # And the names of the results came back from the calls they answer
    assert reply.text == "[0 earlier] lookup returned: warm agents; loop returned: loop broke"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
async def test_anthropic_history_with_tool_steps_is_sent_in_its_format(
    make_provider: MakeProvider, control: httpx.AsyncClient
) -> None:
    # Given a model turn with text and two tool calls, then their results (one an error)
    calls = [
        ToolCall(id="toolu_a", name="lookup", arguments={"word": "pool"}),
        ToolCall(id="toolu_b", name="loop"),
    ]
    messages = [
        Message("user", "look it up"),
        Message("assistant", "Looking.", tool_calls=calls),
        Message("tool", "warm agents", tool_call_id="toolu_a", name="lookup"),
        Message("tool", "loop broke", tool_call_id="toolu_b", name="loop", is_error=True),
    ]

    # When the provider sends it
    reply, _ = await ask(make_provider("anthropic"), messages)

    # Then the results went as ONE user message of tool_result blocks, after text + tool_use blocks
    body = await last_body(control, "anthropic")
    assert body["messages"] == [
        {"role": "user", "content": "look it up"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {"word": "pool"}},
                {"type": "tool_use", "id": "toolu_b", "name": "loop", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "warm agents"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "loop broke", "is_error": True},
            ],
        },
    ]
    assert body["tools"] == [
        {"name": "lookup", "input_schema": WORD, "description": "Look a word up."},
        {
            "name": "loop",
            "input_schema": {"type": "object", "properties": {}},
            "description": "Go round again.",
        },
    ]
    assert body["system"] == SYSTEM
    assert reply.text == "[0 earlier] lookup returned: warm agents; loop returned: loop broke"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", SDK_KINDS)
async def test_without_tools_no_tools_parameter_is_sent(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    await ask(make_provider(kind), [Message("user", "hello")], tools=[])

    assert "tools" not in await last_body(control, kind)


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", SDK_KINDS)
async def test_a_stream_cut_among_tool_call_fragments_is_retried(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    # Given a connection cut after the first events of a tool call (no text reached anyone)
    (await control.post("/_fake/faults", json={"faults": ["drop"]})).raise_for_status()
    prompt = Prompt(system=SYSTEM, messages=[Message("user", '@lookup {"word": "a long word"}')], tools=TOOLS)
    retried: list[str] = []

    # When the call runs with a retry allowed
    reply = await generate_with_retries(
        make_provider(kind),
        prompt,
        lambda _: None,
        retries=1,
        on_retry=lambda e, _: retried.append(e.error_code),
    )

    # Then the cut is retryable and the second attempt brings the whole call
    assert retried == ["PROVIDER_UNAVAILABLE"]
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("lookup", {"word": "a long word"})]


def openai_json(content: str, *more: dict[str, Any]) -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": WORD}}
    return {"model": "fake-1", "messages": [{"role": "user", "content": content}, *more], "tools": [tool]}


def anthropic_json(content: str, *more: dict[str, Any]) -> dict[str, Any]:
    tool = {"name": "lookup", "description": "Look a word up.", "input_schema": WORD}
    messages = [{"role": "user", "content": content}, *more]
    return {"model": "fake-1", "max_tokens": 64, "messages": messages, "tools": [tool]}


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
async def test_openai_plain_json_carries_tool_calls_and_takes_results(control: httpx.AsyncClient) -> None:
    headers = {"authorization": f"Bearer {KEY}"}

    first = (
        await control.post("/v1/chat/completions", json=openai_json('@lookup {"word": "a"}'), headers=headers)
    ).json()
    (choice,) = first["choices"]
    (call,) = choice["message"]["tool_calls"]
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": call["id"], "content": "the letter a"}
    body = openai_json('@lookup {"word": "a"}', assistant, result)
    second = (await control.post("/v1/chat/completions", json=body, headers=headers)).json()

    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "lookup", "arguments": '{"word":"a"}'}
    assert first["usage"]["completion_tokens"] == 1
    assert second["choices"][0]["message"]["content"] == "[0 earlier] lookup returned: the letter a"
    assert second["choices"][0]["finish_reason"] == "stop"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
async def test_anthropic_plain_json_carries_tool_use_and_takes_results(control: httpx.AsyncClient) -> None:
    headers = {"x-api-key": KEY}

    first = (
        await control.post("/v1/messages", json=anthropic_json('@lookup {"word": "a"}'), headers=headers)
    ).json()
    (block,) = first["content"]
    assistant = {"role": "assistant", "content": first["content"]}
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "an a"}],
    }
    second = (
        await control.post("/v1/messages", json=anthropic_json("x", assistant, result), headers=headers)
    ).json()

    assert first["stop_reason"] == "tool_use"
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("lookup", {"word": "a"})
    assert second["content"] == [{"type": "text", "text": "[0 earlier] lookup returned: an a"}]
    assert second["stop_reason"] == "end_turn"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
async def test_the_server_refuses_results_that_answer_no_call(control: httpx.AsyncClient) -> None:
    """As the real APIs do: a result must answer a call of the message right before it, and every
    call must have its result."""
    stray_openai = openai_json("hi", {"role": "tool", "tool_call_id": "call_x", "content": "?"})
    stray_anthropic = anthropic_json(
        "hi", {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}]}
    )
    use = {"type": "tool_use", "id": "toolu_y", "name": "lookup", "input": {}}
    unanswered = anthropic_json(
        "hi", {"role": "assistant", "content": [use]}, {"role": "user", "content": "so?"}
    )

    responses = [
        await control.post(
            "/v1/chat/completions", json=stray_openai, headers={"authorization": f"Bearer {KEY}"}
        ),
        await control.post("/v1/messages", json=stray_anthropic, headers={"x-api-key": KEY}),
        await control.post("/v1/messages", json=unanswered, headers={"x-api-key": KEY}),
    ]

    assert [r.status_code for r in responses] == [400, 400, 400]
    assert responses[0].json()["error"]["type"] == "invalid_request_error"
    assert responses[2].json()["error"]["type"] == "invalid_request_error"
    assert "toolu_y" in responses[2].json()["error"]["message"]


@pytest.mark.timeout(5)
def test_openai_arguments_that_are_not_an_object_are_kept_as_written() -> None:
    assert parse_arguments('{"word": "a"}') == {"word": "a"}
    assert parse_arguments("") == {}
    assert parse_arguments("{oops") == {RAW_ARGUMENTS_KEY: "{oops"}
    assert parse_arguments("[1, 2]") == {RAW_ARGUMENTS_KEY: "[1, 2]"}


@pytest.mark.timeout(5)
def test_the_fake_model_is_deterministic_and_its_tokens_rebuild_the_text() -> None:
    messages = [Message("user", 'x @lookup {"word": "@loop {}"} y')]

    once = respond(SYSTEM, messages, {"lookup", "loop"}, REPLY_TOKENS)
    again = respond(SYSTEM, messages, {"lookup", "loop"}, REPLY_TOKENS)
    results = [*messages, Message("assistant", "", tool_calls=once.tool_calls)]
    results.append(Message("tool", "  spaced\n out  ", tool_call_id=once.tool_calls[0].id, name="lookup"))
    quoted = respond(SYSTEM, results, {"lookup"}, REPLY_TOKENS)

    assert once == again and len(once.tool_calls) == 1  # a marker inside the arguments is theirs
    assert once.tool_calls[0].arguments == {"word": "@loop {}"}
    assert quoted.text == "[0 earlier] lookup returned:   spaced\n out  " == "".join(quoted.tokens)
    assert markers("@a {} @b {", {"a", "b"}) == [("a", {})]


@pytest.mark.timeout(30)
def test_the_fake_server_needs_nothing_from_workers() -> None:
    """It runs where only ``agentpool`` and ``shared`` are installed (a load-test box)."""
    code = (
        "import sys, agentpool.fake_llm; print(sorted({m.split('.')[0] for m in sys.modules} & {'workers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=20)
    assert out.stdout.strip() == "[]"
