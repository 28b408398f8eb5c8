"""A pool whose deployments use the real openai and anthropic SDKs, against the fake LLM server."""

from __future__ import annotations

import collections
from pathlib import Path

import httpx
import pytest

from agentpool.fake_llm import FakeLLMSettings, running
from agentpool.shared.config import load_config, parse_config
from agentpool.shared.messages import Chunk, End
from tests.conftest import System, wait_until

pytestmark = pytest.mark.timeout(90)

KEY = "sk-fake-pool-test"
ROOT = Path(__file__).resolve().parent.parent

POOL = """
[providers.oa]
kind = "openai"
base_url = "{url}/v1"
api_key_env = "AGENTPOOL_TEST_FAKE_KEY"

[providers.an]
kind = "anthropic"
base_url = "{url}"
api_key_env = "{an_key_env}"

[agent_types.oa]
provider = "oa"
model = "gpt-fake"
system_prompt = "You are the OpenAI-backed agent for {{PRODUCT}}."
max_tokens = 64

[agent_types.an]
provider = "an"
model = "claude-fake"
system_prompt = "You are the Anthropic-backed agent."
max_tokens = 64

[pools.mix]
limits = {{ concurrency = 4 }}

[[pools.mix.deployments]]
name = "oa"
agent_type = "oa"
replicas = 1
weight = 50

[[pools.mix.deployments]]
name = "an"
agent_type = "an"
replicas = 1
weight = 50
"""


async def test_both_sdks_stream_with_usage_and_history(make_system, monkeypatch) -> None:
    monkeypatch.setenv("AGENTPOOL_TEST_FAKE_KEY", KEY)
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=16, tokens_per_s=100)) as fake:
        config = parse_config(POOL.format(url=fake.url, an_key_env="AGENTPOOL_TEST_FAKE_KEY"), "mix.toml")
        system: System = await make_system(config)
        client = system.client
        by_agent: dict[str, list[str]] = collections.defaultdict(list)
        # Threads spread over both deployments (weighted rendezvous, 50/50)
        for i in range(12):
            events = [
                e
                async for e in client.stream(
                    "mix", "hello there", thread_id=f"mix-{i}", context_variables={"PRODUCT": "agentpool"}
                )
            ]
            end = events[-1]
            assert isinstance(end, End), end
            chunks = [e for e in events if isinstance(e, Chunk)]
            assert len(chunks) >= 3  # streamed text arrives chunk by chunk
            assert "".join(c.text for c in chunks) == end.content
            assert end.usage.output_tokens == 16 and end.usage.input_tokens > 0
            by_agent[end.agent_id].append(f"mix-{i}")
        assert set(by_agent) == {"mix-oa-1", "mix-an-1"}
        # History from earlier turns reaches each provider, in its own format
        async with httpx.AsyncClient(base_url=fake.url) as http:
            for agent, threads in by_agent.items():
                second = await client.ask(
                    "mix", "and again?", thread_id=threads[0], context_variables={"PRODUCT": "agentpool"}
                )
                assert second.agent_id == agent
                assert second.content.startswith("[2 earlier]")
                stats = (await http.get("/_fake/stats")).json()
                api = "openai" if agent.endswith("oa-1") else "anthropic"
                body = stats["bodies"][api][-1]
                if api == "openai":  # system prompt first, as a system message
                    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
                    assert body["messages"][0]["content"] == "You are the OpenAI-backed agent for agentpool."
                else:  # system prompt as the top-level `system` parameter
                    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
                    assert body["system"] == "You are the Anthropic-backed agent."


async def test_bad_key_marks_the_replica_unhealthy_and_it_gets_no_traffic(make_system, monkeypatch) -> None:
    monkeypatch.setenv("AGENTPOOL_TEST_FAKE_KEY", KEY)
    monkeypatch.setenv("AGENTPOOL_TEST_BAD_KEY", "sk-wrong")
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=8)) as fake:
        config = parse_config(POOL.format(url=fake.url, an_key_env="AGENTPOOL_TEST_BAD_KEY"), "mix.toml")
        system: System = await make_system(config, start=False)
        await system.start_worker("mix", "oa", 1)
        bad = await system.start_worker("mix", "an", 1, wait=False)
        await wait_until(
            lambda: bad.info.status == "unhealthy", 15, "the bad-key replica to report unhealthy"
        )
        assert "auth" in bad.info.detail.lower() or "401" in bad.info.detail

        async def only_healthy_routed() -> bool:
            await system.client.refresh_membership()
            return [r.id for r in system.client.router.members("mix")] == ["mix-oa-1"]

        await wait_until(only_healthy_routed, 10, "routing membership = the healthy replica only")
        for i in range(6):
            reply = await system.client.ask(
                "mix", "hi", thread_id=f"t-{i}", context_variables={"PRODUCT": "agentpool"}
            )
            assert reply.agent_id == "mix-oa-1"


async def test_the_shipped_providers_example_runs_on_both_sdks(make_system, monkeypatch) -> None:
    """shared/pools.providers.example.toml as users run it, pointed at the fake server by the
    SDKs' own base-URL variables (the file sets no base_url)."""
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=12)) as fake:
        # Given the env a user sets (keys) plus the SDKs' standard base-URL overrides
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_BASE_URL", f"{fake.url}/v1")
        config = load_config(ROOT / "shared/pools.providers.example.toml")
        system: System = await make_system(config)
        # When each pool is asked, Then it answers through its own SDK's wire format
        for pool, api, model in (
            ("claude", "anthropic", "claude-sonnet-4-5"),
            ("gpt", "openai", "gpt-4.1-mini"),
        ):
            before = fake.fake.requests[api]
            end = await system.client.ask(pool, "hello", context_variables={"PRODUCT": "agentpool"})
            assert end.agent_id.startswith(f"{pool}-"), end
            assert end.content and end.usage.output_tokens == 12, end
            assert fake.fake.requests[api] == before + 1
            assert fake.fake.bodies[api][-1]["model"] == model
