"""Human approval: a tool listed in ``approval_required`` pauses the run until someone decides.

The model runs behind the fake LLM server (openai SDK), so a test can count the model calls and
see that the call made before the pause is never repeated.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from agentpool.broker.client import AgentPoolClient
from agentpool.fake_llm import FakeLLMSettings, Running, running
from agentpool.shared.config import Config, parse_config
from agentpool.shared.errors import Interrupted, RequestFailed, StateConflict
from agentpool.shared.messages import End, ToolCall, ToolResult
from tests import agents_support
from tests.conftest import System, cleanup_namespace, running_gateway, wait_until
from tests.fleet_support import end_process, ready, spawn_supervisor, wait_ready

pytestmark = pytest.mark.timeout(90)
KEY = "sk-approval-test"
KEY_ENV = "AGENTPOOL_TEST_APPROVAL_KEY"
REFUND = '@refund {"order_id": "A-1", "amount": 5}'

POOLS = """
[providers.oa]
kind = "openai"
base_url = "{url}/v1"
api_key_env = "AGENTPOOL_TEST_APPROVAL_KEY"

[agent_types.desk]
provider = "oa"
system_prompt = "You are a support desk."
tools = ["tests.agents_support:lookup_order", "tests.agents_support:refund"]
approval_required = ["refund"]

[pools.desk]
limits = {{ concurrency = 4, max_wait_s = {max_wait_s} }}

[[pools.desk.deployments]]
name = "main"
agent_type = "desk"
replicas = {replicas}
"""


def config(url: str, replicas: int = 2, max_wait_s: float = 20) -> Config:
    return parse_config(POOLS.format(url=url, replicas=replicas, max_wait_s=max_wait_s), "desk.toml")


@pytest_asyncio.fixture(loop_scope="session")
async def fake_llm(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    monkeypatch.setenv(KEY_ENV, KEY)
    agents_support.CALLS.clear()
    async with running(FakeLLMSettings(api_key=KEY, reply_tokens=8)) as srv:
        yield srv


def model_calls(fake: Running) -> int:
    return fake.fake.requests["openai"]


async def test_approve_runs_the_tool_once_and_the_answer_completes(make_system, fake_llm: Running) -> None:
    system: System = await make_system(config(fake_llm.url))
    client = system.client
    # When the model asks for a tool that needs approval
    with pytest.raises(Interrupted) as caught:
        await client.ask("desk", f"please refund {REFUND}", thread_id="th-1")
    paused = caught.value.interrupt
    # Then the run pauses before the tool, after one model call
    assert paused.tool_call.name == "refund" and paused.tool_call.arguments == {
        "order_id": "A-1",
        "amount": 5,
    }
    assert [type(s).__name__ for s in paused.steps] == ["ToolCall"]
    assert agents_support.CALLS["refund"] == 0
    assert model_calls(fake_llm) == 1
    # And the thread waits: another request to it is refused with a clear code
    with pytest.raises(RequestFailed) as refused:
        await client.ask("desk", "hello?", thread_id="th-1")
    assert refused.value.error_code == "THREAD_WAITING"
    assert model_calls(fake_llm) == 1
    # When a human approves
    end = await client.resume(paused.request_id, approve=True)
    # Then the tool ran once, the model was called once more, and the answer has the result
    assert agents_support.CALLS["refund"] == 1
    assert model_calls(fake_llm) == 2
    assert isinstance(end, End) and "refunded 5 on A-1" in end.content
    assert end.resumed_from == paused.request_id and end.thread_id == "th-1"
    assert [type(s).__name__ for s in end.steps] == ["ToolCall", "ToolResult"]
    # A second decision on the same pause is refused; the thread goes on as usual
    with pytest.raises(StateConflict) as twice:
        await client.resume(paused.request_id, approve=False)
    assert twice.value.error_code == "ALREADY_RESUMED"
    assert twice.value.details["resumed_by"] == end.request_id
    after = await client.ask("desk", "thanks", thread_id="th-1")
    assert after.content.startswith("[4 earlier]"), after.content  # user, call, result, answer
    assert agents_support.CALLS["refund"] == 1


async def test_deny_tells_the_model_and_it_answers(make_system, fake_llm: Running) -> None:
    system: System = await make_system(config(fake_llm.url))
    with pytest.raises(Interrupted) as caught:
        await system.client.ask("desk", REFUND)
    events = [
        e
        async for e in system.client.resume_stream(
            caught.value.interrupt.request_id, approve=False, reason="over the limit"
        )
    ]
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.is_error and result.error_code == "TOOL_DENIED" and "over the limit" in result.content
    end = events[-1]
    assert isinstance(end, End) and "over the limit" in end.content
    assert agents_support.CALLS["refund"] == 0
    assert model_calls(fake_llm) == 2


async def test_resume_over_http(make_system, fake_llm: Running) -> None:
    system: System = await make_system(config(fake_llm.url))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        # JSON: 200 with status interrupted and the pending call
        first = await http.post("/v1/ask/desk", json={"content": REFUND})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["status"] == "interrupted" and body["interrupt"]["tool_call"]["name"] == "refund"
        rid = body["request_id"]
        got = await http.get(f"/v1/requests/{rid}")
        assert got.status_code == 200 and got.json()["status"] == "interrupted"
        # Bad decisions are 4xx and leave the pause in place
        bad = await http.post(f"/v1/requests/{rid}/resume", json={"approve": "yes"})
        assert bad.status_code == 400 and bad.json()["error_code"] == "VALIDATION_ERROR"
        empty = await http.post(f"/v1/requests/{rid}/resume", content=b"")
        assert empty.status_code == 400
        unknown = await http.post(
            "/v1/requests/0123456789abcdef0123456789abcdef/resume", json={"approve": True}
        )
        assert unknown.status_code == 404
        # Approve, streaming the rest of the run
        async with http.stream(
            "POST", f"/v1/requests/{rid}/resume", json={"approve": True, "stream": True}
        ) as resumed:
            assert resumed.status_code == 200
            assert resumed.headers["x-resumed-from"] == rid
            text = "".join([chunk async for chunk in resumed.aiter_text()])
        assert "event: tool_result" in text and "event: end" in text
        assert "refunded 5 on A-1" in text
        again = await http.post(f"/v1/requests/{rid}/resume", json={"approve": True})
        assert again.status_code == 409 and again.json()["error_code"] == "ALREADY_RESUMED"
        # SSE on the ask: the stream ends with the interrupt event
        async with http.stream(
            "POST", "/v1/ask/desk", json={"content": REFUND}, headers={"Accept": "text/event-stream"}
        ) as sse:
            frames = "".join([chunk async for chunk in sse.aiter_text()])
        assert (
            "event: tool_call" in frames
            and frames.rstrip().split("\n\n")[-1].split("\n")[1] == "event: interrupt"
        )
        finished = await http.post(f"/v1/requests/{body['request_id']}/resume", json={"approve": False})
        assert finished.status_code == 409  # already resumed above
    assert agents_support.CALLS["refund"] == 1


async def test_a_paused_run_survives_killing_every_process(
    settings, fake_llm: Running, tmp_path: Path
) -> None:
    # Given a fleet of real processes (a supervisor and its replica) and a paused run
    calls = tmp_path / "calls.txt"
    os.environ["AGENTPOOL_TEST_CALLS"] = str(calls)
    path = tmp_path / "desk.toml"
    path.write_text(POOLS.format(url=fake_llm.url, replicas=1, max_wait_s=20))
    cfg = config(fake_llm.url, replicas=1)
    sup = await spawn_supervisor(settings, path)
    client = AgentPoolClient(settings, cfg)
    await client.start()
    try:
        await wait_ready(client, 1, 30, pool="desk")
        with pytest.raises(Interrupted) as caught:
            await client.ask("desk", REFUND, thread_id="th-k")
        rid = caught.value.interrupt.request_id
        assert model_calls(fake_llm) == 1
        # When every agentpool process dies hard (the supervisor, its replica, the client)
        replica = (await ready(client, "desk"))[0]
        os.kill(sup.pid, signal.SIGKILL)
        os.kill(replica.pid, signal.SIGKILL)
        await sup.wait()
        await client.aclose()
        # and a new fleet starts
        sup = await spawn_supervisor(settings, path)
        client = AgentPoolClient(settings, cfg)
        await client.start()
        await wait_until(lambda: _fresh(client, exclude=replica.pid), 30, "a new replica ready")
        # Then the run goes on from where it paused: the tool once, the model not asked again
        end = await client.resume(rid, approve=True)
        assert "refunded 5 on A-1" in end.content and end.resumed_from == rid
        assert calls.read_text().split() == ["refund"]
        assert model_calls(fake_llm) == 2
    finally:
        os.environ.pop("AGENTPOOL_TEST_CALLS", None)
        await end_process(sup)
        await client.aclose()
        await cleanup_namespace(settings, cfg)


async def _fresh(client: AgentPoolClient, exclude: int) -> bool:
    return bool(await ready(client, "desk", exclude_pids=frozenset({exclude})))


def test_the_interrupt_event_carries_the_tool_call() -> None:
    from agentpool.shared.messages import EVENT_DECODER, EVENT_ENCODER, Interrupt

    event = Interrupt(
        request_id="r",
        thread_id="t",
        agent_id="a",
        tool_call=ToolCall(id="c", name="refund", arguments={"x": 1}),
    )
    back = EVENT_DECODER.decode(EVENT_ENCODER.encode(event))
    assert back == event


async def test_a_continuation_no_replica_started_can_be_claimed_again(make_system, fake_llm: Running) -> None:
    system: System = await make_system(config(fake_llm.url, replicas=1, max_wait_s=1))
    with pytest.raises(Interrupted) as caught:
        await system.client.ask("desk", REFUND)
    rid = caught.value.interrupt.request_id
    # When the approval comes while no replica runs, the continuation times out in the queue
    await system.stop_worker("desk-main-1")
    await system.wait_members("desk")
    with pytest.raises(RequestFailed) as timed_out:
        await system.client.resume(rid, approve=True)
    assert timed_out.value.error_code == "QUEUE_TIMEOUT"
    # Then the pause is still there: once a replica is back, the same decision goes through
    await system.start_worker("desk", "main", 1)
    await system.wait_members("desk")
    end = await system.client.resume(rid, approve=True)
    assert "refunded 5 on A-1" in end.content and agents_support.CALLS["refund"] == 1
