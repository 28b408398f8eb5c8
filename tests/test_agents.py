"""Agents on warm replicas: python factories, function tools, the tool loop, bad agent code.

Workers run in this process on real RabbitMQ and Redis; models are the in-process fake or, through
the real openai and anthropic SDKs, the fake LLM server. The fake model calls a tool when the user
writes ``@name {json}``, and answers with the tool's result verbatim once it has it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from agentpool.fake_llm import FakeLLMSettings, Running, running
from agentpool.shared.config import Config, parse_config
from agentpool.shared.errors import ConfigError, RequestFailed
from agentpool.shared.messages import Chunk, End, Error, Event, Step, ToolCall, ToolResult
from agentpool.status import render
from tests import agents_support
from tests.conftest import System, wait_until

pytestmark = pytest.mark.timeout(60)
KEY = "sk-agents-test"
KEY_ENV = "AGENTPOOL_TEST_AGENTS_KEY"


def pools(agent: str, *, replicas: int = 1, provider: str = "fake", url: str = "", pool: str = "a") -> Config:
    """One pool ``pool`` whose agent type ``agent`` is the given TOML body."""
    providers = f"""
[providers.fake]
kind = "fake"

[providers.oa]
kind = "openai"
base_url = "{url}/v1"
api_key_env = "{KEY_ENV}"

[providers.an]
kind = "anthropic"
base_url = "{url or "http://127.0.0.1:9"}"
api_key_env = "{KEY_ENV}"
"""
    text = f"""{providers}
[agent_types.bot]
provider = "{provider}"
system_prompt = "You are a test agent."
max_tokens = 256
{agent}

[pools.{pool}]
limits = {{ concurrency = 4 }}

[[pools.{pool}.deployments]]
name = "main"
agent_type = "bot"
replicas = {replicas}
"""
    return parse_config(text, "agents.toml")


async def collect(system: System, content: str, **kw: object) -> list[Event]:
    return [e async for e in system.client.stream(kw.pop("pool", "a"), content, **kw)]  # type: ignore[arg-type]


def build_seconds() -> tuple[float, float]:
    """agentpool_agent_build_seconds of pool a, deployment main: (count, sum)."""
    labels = {"pool": "a", "deployment": "main"}
    count = REGISTRY.get_sample_value("agentpool_agent_build_seconds_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("agentpool_agent_build_seconds_sum", labels) or 0.0


def kinds(events: list[Event]) -> list[str]:
    out: list[str] = []
    for e in events:
        name = type(e).__name__
        if not (out and out[-1] == name == "Chunk"):
            out.append(name)
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fake_llm() -> AsyncIterator[Running]:
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=8)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    agents_support.CALLS.clear()
    agents_support.CANCELLED.clear()


async def test_python_factory_runs_once_per_replica_before_ready(make_system) -> None:
    # Given a python agent whose factory takes 3 s
    config = pools('kind = "python"\nfactory = "tests.agents_support:slow_build"\noptions = { build_s = 3 }')
    system: System = await make_system(config, start=False)
    built_before = build_seconds()  # this process's registry: other tests' pools "a" count too
    t0 = time.monotonic()
    worker = await system.start_worker("a", "main", 1, wait=False)
    # While it builds, the replica heartbeats as starting and takes no work
    await wait_until(lambda: worker.info.heartbeat_at > 0, 5, "first heartbeat")
    assert worker.info.status == "starting" and not worker.ready.is_set()
    await asyncio.wait_for(worker.ready.wait(), 15)
    assert time.monotonic() - t0 >= 3.0
    assert 2900 <= worker.info.build_ms <= 4500, worker.info.build_ms
    await system.wait_members("a")
    status = await render(system.settings, system.config, "a")  # what `agentpool status a` prints
    assert "BUILD MS" in status and f"{worker.info.build_ms:.0f}" in status, status
    pool = await system.client.fleet.status("a")  # what GET /v1/pools/a answers
    assert [r.build_ms for r in pool.replicas] == [worker.info.build_ms]
    count, total = build_seconds()
    assert count == built_before[0] + 1 and 2.9 <= total - built_before[1] <= 4.5  # the metric
    # When 20 requests come, Then each is answered fast, by the agent built once
    for i in range(20):
        events = await collect(system, f"question {i}", thread_id="t-1")
        end = events[-1]
        assert isinstance(end, End), end
        assert end.timings.total_ms < 100, end.timings
        assert any(isinstance(e, Step) and e.name == "plan" for e in events)
        assert end.content.endswith(f"(history {min(i, 50) * 2})")
        assert end.usage.output_tokens > 0 and end.usage.input_tokens > 0
    assert agents_support.BUILDS["a-main-1"] == 1


async def test_usage_sums_every_model_call_of_a_python_agent(make_system) -> None:
    system: System = await make_system(pools('kind = "python"\nfactory = "tests.agents_support:async_build"'))
    one = await system.client.ask("a", "count my tokens")
    plain: System = await make_system(pools("", pool="b"))
    single = await plain.client.ask("b", "count my tokens")
    # Echo makes two model calls (a plan and the streamed answer): more than one call's tokens
    assert one.usage.input_tokens > single.usage.input_tokens
    assert one.usage.output_tokens > single.usage.output_tokens


@pytest.mark.parametrize("provider", ["fake", "oa", "an"])
async def test_chat_agent_calls_a_tool_and_the_thread_keeps_the_steps(
    make_system, fake_llm: Running, provider: str
) -> None:
    config = pools(
        'tools = ["tests.agents_support:lookup_order"]', replicas=2, provider=provider, url=fake_llm.url
    )
    system: System = await make_system(config)
    # When the model is asked to call the tool
    events = await collect(system, 'Where is my order? @lookup_order {"order_id": "A-1"}', thread_id="th")
    # Then the stream carries the call, its result, then text that contains the result
    assert kinds(events) == ["Start", "ToolCall", "ToolResult", "Chunk", "End"], kinds(events)
    call, result, end = events[1], events[2], events[-1]
    assert (
        isinstance(call, ToolCall) and call.name == "lookup_order" and call.arguments == {"order_id": "A-1"}
    )
    assert isinstance(result, ToolResult) and result.id == call.id and not result.is_error
    assert json.loads(result.content) == {"order_id": "A-1", "status": "shipped"}
    assert isinstance(end, End) and result.content in end.content
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == end.content
    assert [type(s).__name__ for s in end.steps] == ["ToolCall", "ToolResult"]
    assert agents_support.CALLS["lookup_order"] == 1
    # When the first replica is gone, the follow-up goes to the other one
    await system.stop_worker(end.agent_id)
    await system.wait_members("a")
    follow = await system.client.ask("a", "thanks!", thread_id="th")
    assert follow.agent_id != end.agent_id
    # Then it saw the tool steps in its API's format
    if provider == "fake":
        assert follow.content.startswith("[4 earlier]"), follow.content
        return
    async with httpx.AsyncClient(base_url=fake_llm.url) as http:
        stats = (await http.get("/_fake/stats")).json()
    api = "openai" if provider == "oa" else "anthropic"
    body = stats["bodies"][api][-1]
    if api == "openai":
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["system", "user", "assistant", "tool", "assistant", "user"], roles
        assert body["messages"][2]["tool_calls"][0]["function"]["name"] == "lookup_order"
        assert body["messages"][3]["tool_call_id"] == call.id
        assert body["tools"][0]["function"]["name"] == "lookup_order"
    else:
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user"], roles
        blocks = body["messages"][1]["content"]
        assert any(b["type"] == "tool_use" and b["name"] == "lookup_order" for b in blocks)
        results = body["messages"][2]["content"]
        assert results[0]["type"] == "tool_result" and results[0]["tool_use_id"] == call.id
        assert body["tools"][0]["name"] == "lookup_order"


async def test_two_tool_calls_of_one_turn_run_concurrently(make_system) -> None:
    config = pools('tools = ["tests.agents_support:nap", "tests.agents_support:nap2"]')
    system: System = await make_system(config)
    t0 = time.monotonic()
    events = await collect(system, 'both please: @nap {"seconds": 1} @nap2 {"seconds": 1}')
    took = time.monotonic() - t0
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.name for r in results] == ["nap", "nap2"] and not any(r.is_error for r in results)
    assert all(r.duration_ms >= 1000 for r in results)
    assert took < 1.6, took
    assert isinstance(events[-1], End)


async def test_a_raising_tool_and_a_slow_tool_give_the_model_error_results(make_system) -> None:
    config = pools('tools = ["tests.agents_support:explode", "tests.agents_support:dawdle"]')
    system: System = await make_system(config)
    events = await collect(system, "@explode {} @dawdle {}")
    results = {e.name: e for e in events if isinstance(e, ToolResult)}
    assert results["explode"].is_error and results["explode"].error_code == "TOOL_ERROR"
    assert "RuntimeError: the tool broke" in results["explode"].content
    assert results["dawdle"].is_error and results["dawdle"].error_code == "TOOL_TIMEOUT"
    assert results["dawdle"].duration_ms < 2000
    end = events[-1]
    assert isinstance(end, End) and "the tool broke" in end.content  # the model heard, and answered


async def test_bad_tool_arguments_and_unknown_tools_are_error_results(make_system) -> None:
    system: System = await make_system(pools('tools = ["tests.agents_support:lookup_order"]'))
    events = await collect(system, '@lookup_order {"order": 7}')
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.is_error and result.error_code == "TOOL_ARGUMENTS_INVALID", result
    assert isinstance(events[-1], End)


async def test_a_loop_past_max_tool_rounds_ends_with_a_clear_error(make_system) -> None:
    system: System = await make_system(pools('tools = ["tests.agents_support:again"]\nmax_tool_rounds = 3'))
    events = await collect(system, "@again {}")
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 3
    err = events[-1]
    assert isinstance(err, Error) and err.error_code == "TOOL_ROUNDS_EXCEEDED", err
    # the replica is fine afterwards
    assert isinstance((await collect(system, "hello"))[-1], End)


async def test_a_python_agent_can_run_the_built_in_loop(make_system) -> None:
    config = pools(
        'kind = "python"\nfactory = "tests.agents_support:loop_build"\n'
        'tools = ["tests.agents_support:lookup_order"]'
    )
    system: System = await make_system(config)
    events = await collect(system, '@lookup_order {"order_id": "B-2"}')
    assert kinds(events) == ["Start", "Step", "ToolCall", "ToolResult", "Chunk", "End"], kinds(events)
    assert "packing" in events[-1].content  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("agent", "reason"),
    [
        ('kind = "python"\nfactory = "tests.agents_support:broken_build"', "the model weights are missing"),
        ('kind = "python"\nfactory = "tests.agents_support:not_an_agent"', "no run(turn)"),
        ('kind = "python"\nfactory = "tests.agents_support:nowhere"', "has no attribute 'nowhere'"),
        ('kind = "python"\nfactory = "tests.no_such_module:build"', "cannot import"),
        ('tools = ["tests.agents_support:missing_tool"]', "missing_tool"),
        ('tools = ["tests.agents_support:bad_signature"]', "cannot become a JSON schema"),
        ('tools = ["tests.agents_support:nap"]\napproval_required = ["nope"]', "approval_required"),
        ('prompt_renderer = "tests.agents_support:no_renderer"', "prompt_renderer"),
    ],
)
async def test_a_bad_agent_leaves_the_replica_unhealthy_with_the_reason(
    make_system, agent: str, reason: str
) -> None:
    system: System = await make_system(pools(agent), start=False)
    worker = await system.start_worker("a", "main", 1, wait=False)
    await wait_until(lambda: worker.info.status == "unhealthy", 10, "unhealthy")
    assert reason in worker.info.detail, worker.info.detail

    async def beats_unhealthy() -> bool:
        live = await system.client.registry.replicas("a")
        return [r.status for r in live] == ["unhealthy"] and reason in live[0].detail

    await wait_until(beats_unhealthy, 5, "an unhealthy heartbeat with the reason")
    assert not worker.ready.is_set()
    # it stays up (no crash loop) and gets no traffic
    task, _ = system._tasks[worker.replica_id]
    assert not task.done()
    await system.client.refresh_membership()
    assert system.client.router.members("a") == []


@pytest.mark.parametrize(
    ("agent", "field"),
    [
        ('kind = "python"', "agent_types.bot.factory"),
        ('factory = "x:y"', "agent_types.bot.factory"),
        ('kind = "robot"', "agent_types.bot.kind"),
        ('tools = ["no-colon"]', "agent_types.bot.tools"),
        ('mcp_servers = [{ name = "x" }]', "agent_types.bot.mcp_servers[0]"),
        (
            'mcp_servers = [{ name = "x", command = ["a"], url = "http://h/mcp" }]',
            "agent_types.bot.mcp_servers[0]",
        ),
        ('kind = "python"\nfactory = "a:b"\napproval_required = ["t"]', "agent_types.bot.approval_required"),
        ("max_tool_rounds = -1", "agent_types.bot.max_tool_rounds"),
    ],
)
def test_agent_config_errors_name_the_field_at_load(agent: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pools(agent)
    assert field in caught.value.message, caught.value.message


async def test_a_client_cancel_stops_a_tool_in_flight(make_system) -> None:
    system: System = await make_system(pools('tools = ["tests.agents_support:nap"]'))
    sub, ticket = await system.client.submit_subscribed("a", '@nap {"seconds": 30}')
    seen: list[bytes] = []
    async for _id, kind, _data in system.client.stream_raw(ticket, sub=sub):
        seen.append(kind)
        if kind == b"tool_call":
            t0 = time.monotonic()
            await system.client.store.cancel(ticket.request_id)
    assert seen[-1] == b"error"
    assert time.monotonic() - t0 < 2.0
    await wait_until(lambda: agents_support.CANCELLED == ["nap"], 5, "the tool to see its cancel")


async def test_the_run_deadline_cancels_the_agent(make_system) -> None:
    system: System = await make_system(pools('tools = ["tests.agents_support:nap"]\nrun_timeout_s = 0.5'))
    with pytest.raises(RequestFailed) as caught:
        await system.client.ask("a", '@nap {"seconds": 30}')
    assert caught.value.error_code == "RUN_TIMEOUT"
    await wait_until(lambda: agents_support.CANCELLED == ["nap"], 5, "the tool to see its cancel")


@pytest.mark.parametrize("provider", ["oa", "an"])
async def test_a_thread_with_tool_steps_goes_on_with_an_agent_without_tools(
    make_system, fake_llm: Running, provider: str
) -> None:
    # Given a thread whose first turn ran a tool
    tools: System = await make_system(
        pools('tools = ["tests.agents_support:lookup_order"]', provider=provider, url=fake_llm.url)
    )
    await tools.client.ask("a", '@lookup_order {"order_id": "A-1"}', thread_id="mixed")
    # When a pool whose agent offers no tools answers the same thread
    plain: System = await make_system(pools("", provider=provider, url=fake_llm.url, pool="b"))
    end = await plain.client.ask("b", "and now?", thread_id="mixed")
    # Then the model got the tool exchange as text (APIs refuse tool blocks when no tools are offered)
    assert end.content.startswith("[2 earlier]"), end.content
    async with httpx.AsyncClient(base_url=fake_llm.url) as http:
        body = (await http.get("/_fake/stats")).json()["bodies"][
            "openai" if provider == "oa" else "anthropic"
        ][-1]
    assert "tools" not in body
    history = body["messages"][-3:]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert all(isinstance(m["content"], str) for m in history), history
    assert "[called lookup_order" in history[1]["content"] and "shipped" in history[1]["content"]


async def test_the_http_answer_lists_the_steps_and_sse_carries_them(make_system) -> None:
    from tests.conftest import running_gateway

    system: System = await make_system(pools('tools = ["tests.agents_support:lookup_order"]'))
    ask = {"content": '@lookup_order {"order_id": "B-2"}'}
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        answer = await http.post("/v1/ask/a", json=ask)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "completed"
        assert [s["type"] for s in body["steps"]] == ["tool_call", "tool_result"]
        assert body["steps"][0]["arguments"] == {"order_id": "B-2"}
        assert body["steps"][1]["content"] in body["content"]
        async with http.stream("POST", "/v1/ask/a", json={**ask, "stream": True}) as sse:
            names = [line[7:] async for line in sse.aiter_lines() if line.startswith("event: ")]
        assert names[:3] == ["start", "tool_call", "tool_result"] and names[-1] == "end", names
        # a broken tool call is still a 200 with an error result, never a 500
        bad = await http.post("/v1/ask/a", json={"content": '@lookup_order {"order_id": "Z-9"}'})
        assert bad.status_code == 200 and bad.json()["steps"][1]["error_code"] == "TOOL_ERROR"
