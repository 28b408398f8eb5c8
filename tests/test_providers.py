"""The OpenAI and Anthropic providers through their real SDKs, against the in-process fake LLM.

One fake server per module (reset before each test); faults are scripted through its HTTP control
API, the way a load test drives it, or sent per request with the ``x-fake-fault`` header.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from agentpool.fake_llm import FakeLLMSettings, Running, running
from agentpool.shared.errors import ProviderError
from agentpool.shared.fake_model import count_tokens, fake_tokens
from agentpool.shared.messages import Message, Usage
from agentpool.workers.providers.base import Prompt, Provider, Reply
from agentpool.workers.providers.retry import BACKOFF_CAP_S, backoff_s, generate_with_retries
from tests.conftest import FAKE_KEY_ENV, free_port, wait_until

KEY = "sk-fake-test"
KEY_ENV = FAKE_KEY_ENV
REPLY_TOKENS = 12
SYSTEM = "You are terse."
KINDS = ["openai", "anthropic"]
MakeProvider = Callable[..., Provider]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fake_llm() -> AsyncIterator[Running]:
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=REPLY_TOKENS, retry_after_s=0.05)) as srv:
        yield srv


def prompt(*turns: str) -> Prompt:
    """A prompt whose turns alternate user, assistant, user, ..."""
    roles = ("user", "assistant")
    return Prompt(system=SYSTEM, messages=[Message(roles[i % 2], t) for i, t in enumerate(turns)])  # type: ignore[arg-type]


def expected_text(p: Prompt, n: int = REPLY_TOKENS) -> str:
    return "".join(fake_tokens(p.system, p.messages, n))


async def stats(control: httpx.AsyncClient) -> dict[str, Any]:
    response = await control.get("/_fake/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def script_faults(control: httpx.AsyncClient, *faults: str) -> None:
    response = await control.post("/_fake/faults", json={"faults": list(faults), "retry_after_s": 0.05})
    response.raise_for_status()


class Recorder:
    """Collects emitted text, retries and backoff delays (the delays are recorded, not slept)."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.retries: list[tuple[str, int]] = []
        self.delays: list[float] = []

    def emit(self, text: str) -> None:
        self.chunks.append(text)

    def on_retry(self, error: ProviderError, attempt: int) -> None:
        self.retries.append((error.error_code, attempt))

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    async def run(self, provider: Provider, p: Prompt, retries: int) -> Reply:
        return await generate_with_retries(
            provider, p, self.emit, retries=retries, on_retry=self.on_retry, sleep=self.sleep
        )


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_streams_text_in_pieces_and_reports_usage(make_provider: MakeProvider, kind: str) -> None:
    provider = make_provider(kind)
    await provider.warm()
    p = prompt("hello there, how are you")
    chunks: list[str] = []

    reply = await provider.generate(p, chunks.append)

    assert len(chunks) > 1
    assert "".join(chunks) == reply.text == expected_text(p)
    assert reply.usage == Usage(
        input_tokens=count_tokens(SYSTEM) + count_tokens(p.messages[0].content), output_tokens=REPLY_TOKENS
    )
    assert reply.stop_reason == "end" and reply.tool_calls == []


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_warm_opens_the_connection_later_calls_reuse(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    provider = make_provider(kind)

    await provider.warm()
    for turn in ("one", "two", "three"):
        await provider.generate(prompt(turn), lambda _: None)

    seen = await stats(control)
    assert seen["models_requests"] == 1 and seen["requests"][kind] == 3
    assert seen["connections"] == 1


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_max_tokens_caps_the_reply(make_provider: MakeProvider, kind: str) -> None:
    provider = make_provider(kind, max_tokens=9)
    p = prompt("count to ten")
    chunks: list[str] = []

    reply = await provider.generate(p, chunks.append)

    assert "".join(chunks) == expected_text(p, 9)
    assert reply.usage.output_tokens == 9 < REPLY_TOKENS
    assert reply.stop_reason == "max_tokens"


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_history_reaches_the_model_in_its_format(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    # Given a thread with two earlier turns
    p = prompt("what is a pool?", "a set of warm agents.", "and a replica?")
    chunks: list[str] = []

    # When the provider answers the new message
    await make_provider(kind).generate(p, chunks.append)

    # Then the model saw both earlier turns, and the system prompt where its API wants it
    assert "".join(chunks).startswith("[2 earlier] Re: and a replica?")
    body = (await stats(control))["bodies"][kind][-1]
    turns = [{"role": m.role, "content": m.content} for m in p.messages]
    if kind == "openai":
        assert body["messages"] == [{"role": "system", "content": SYSTEM}, *turns]
    else:
        assert body["system"] == SYSTEM
        assert body["messages"] == turns
        assert not {"temperature", "top_p"} & body.keys()  # API 2026-10-21 refuses them
    roles = [m["role"] for m in body["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant", "user"]


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limit_then_ok_is_retried_after_retry_after(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    await script_faults(control, "429")
    rec, p = Recorder(), prompt("busy?")

    reply = await rec.run(make_provider(kind), p, retries=2)

    assert "".join(rec.chunks) == expected_text(p)
    assert reply.usage.output_tokens == REPLY_TOKENS
    assert rec.retries == [("PROVIDER_RATE_LIMITED", 1)]
    assert rec.delays and rec.delays[0] >= 0.05  # the server's retry-after
    assert (await stats(control))["requests"][kind] == 2


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_server_errors_give_up_after_retries_plus_one_attempts(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    retries = 2
    await script_faults(control, *["500"] * (retries + 1), "ok")
    rec = Recorder()

    with pytest.raises(ProviderError) as caught:
        await rec.run(make_provider(kind), prompt("anyone there?"), retries=retries)

    assert caught.value.error_code == "PROVIDER_UNAVAILABLE"
    assert caught.value.retryable and not caught.value.fatal
    assert [a for _, a in rec.retries] == [1, 2]
    assert rec.chunks == []
    seen = await stats(control)
    assert seen["requests"][kind] == retries + 1
    assert seen["faults_pending"] == ["ok"]


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_drop_after_text_was_emitted_is_raised_not_retried(
    make_provider: MakeProvider, control: httpx.AsyncClient, kind: str
) -> None:
    await script_faults(control, "drop")
    rec, p = Recorder(), prompt("tell me a long story")

    with pytest.raises(ProviderError) as caught:
        await rec.run(make_provider(kind), p, retries=2)

    assert caught.value.error_code == "PROVIDER_UNAVAILABLE"
    assert rec.chunks, "the drop comes after some text"
    assert expected_text(p).startswith("".join(rec.chunks))  # no text twice
    assert rec.retries == []
    assert (await stats(control))["requests"][kind] == 1


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_bad_key_is_fatal_and_not_retried(
    make_provider: MakeProvider, control: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    rec = Recorder()

    with pytest.raises(ProviderError) as caught:
        await rec.run(make_provider(kind), prompt("let me in"), retries=2)

    assert caught.value.error_code == "PROVIDER_AUTH_FAILED" and caught.value.fatal
    assert rec.retries == []
    assert (await stats(control))["requests"][kind] == 1


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_warm_with_bad_key_is_fatal(
    make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong")

    with pytest.raises(ProviderError) as caught:
        await make_provider(kind).warm()

    assert caught.value.error_code == "PROVIDER_AUTH_FAILED" and caught.value.fatal


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_missing_key_variable_is_fatal_and_named(make_provider: MakeProvider, kind: str) -> None:
    with pytest.raises(ProviderError) as caught:
        await make_provider(kind, key_env="AGENTPOOL_TEST_UNSET_KEY").warm()

    assert caught.value.fatal
    assert "AGENTPOOL_TEST_UNSET_KEY" in caught.value.message


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_warm_against_a_dead_port_is_unavailable(make_provider: MakeProvider, kind: str) -> None:
    url = f"http://127.0.0.1:{dead_port()}" + ("/v1" if kind == "openai" else "")

    with pytest.raises(ProviderError) as caught:
        await make_provider(kind, base_url=url).warm()

    assert caught.value.error_code == "PROVIDER_UNAVAILABLE"
    assert caught.value.retryable and not caught.value.fatal


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("kind", KINDS)
async def test_request_headers_reach_the_server(make_provider: MakeProvider, kind: str) -> None:
    provider = make_provider(kind, timeout_s=0.3)
    p = prompt("short one")
    generate: Any = provider.generate  # the SDK providers take extra_headers beyond the base signature
    chunks: list[str] = []

    await generate(p, chunks.append, extra_headers={"x-fake-reply-tokens": "4"})
    with pytest.raises(ProviderError) as caught:
        await generate(p, chunks.append, extra_headers={"x-fake-fault": "timeout"})

    assert "".join(chunks) == expected_text(p, 4)
    assert caught.value.error_code == "PROVIDER_TIMEOUT" and caught.value.retryable


@pytest.mark.timeout(10)
@pytest.mark.asyncio(loop_scope="session")
async def test_fake_server_answers_plain_json_and_refuses_unknown_faults(
    fake_llm: Running, control: httpx.AsyncClient
) -> None:
    p = prompt("plain please")
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "fake-1", "messages": [{"role": "user", "content": "plain please"}]}

    chat = await control.post(
        "/v1/chat/completions", json=body, headers={**headers, "x-fake-reply-tokens": "6"}
    )
    message = await control.post(
        "/v1/messages", json={**body, "system": SYSTEM, "max_tokens": 3}, headers={"x-api-key": KEY}
    )
    bad = await control.post("/_fake/faults", json={"faults": ["meteor"]})

    no_system = Prompt(system="", messages=p.messages)
    assert chat.json()["choices"][0]["message"]["content"] == expected_text(no_system, 6)
    assert message.json()["content"][0]["text"] == expected_text(p, 3)
    assert message.json()["stop_reason"] == "max_tokens"
    assert bad.status_code == 400


@pytest.mark.timeout(5)
def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    delays = [backoff_s(attempt) for attempt in range(1, 12) for _ in range(20)]

    assert all(0 <= d <= BACKOFF_CAP_S for d in delays)
    assert max(delays) > 1.0  # grows with the attempt
    assert backoff_s(1, retry_after_s=2.5) >= 2.5


async def test_the_fake_llm_command_takes_its_options_as_documented() -> None:
    """``agentpool fake-llm --port P --api-key K``, as the README, compose file and benches run it."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentpool", "fake-llm", "--port", str(port), "--api-key", "sk-cli",
        "--reply-tokens", "5",
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def up() -> bool:
                try:
                    await http.get("/v1/models")
                    return True
                except httpx.TransportError:
                    return False

            await wait_until(up, 20, "fake-llm listening")
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            refused = await http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 401  # --api-key was taken
            ok = await http.post(
                "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-cli"}
            )
            assert ok.status_code == 200
            assert ok.json()["usage"]["completion_tokens"] == 5  # --reply-tokens was taken
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
