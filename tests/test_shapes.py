"""Pool shapes over HTTP: best-of-N fan-out, a group's levels with escalation, the direct endpoint.

Models are the project's fake LLM server reached through the real OpenAI SDK (paced, so a run
takes long enough to see runs overlap and to see a cancelled stream close at the server).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from agentpool.fake_llm import FakeLLMSettings, Running, running
from agentpool.shared.config import Config, parse_config
from tests.conftest import System, running_gateway, wait_until

pytestmark = pytest.mark.timeout(90)
KEY = "sk-shapes-test"
KEY_ENV = "AGENTPOOL_TEST_SHAPES_KEY"
TTFT_MS, TOKENS_PER_S, REPLY_TOKENS = 300, 20, 8  # one model call: 0.3 + 7 / 20 = 0.65 s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fake_llm() -> AsyncIterator[Running]:
    settings = FakeLLMSettings(
        api_key=KEY, reply_tokens=REPLY_TOKENS, ttft_ms=TTFT_MS, tokens_per_s=TOKENS_PER_S
    )
    async with running(settings) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest_asyncio.fixture(loop_scope="session")
async def fake(fake_llm: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake_llm.url, timeout=5) as http:
        (await http.post("/_fake/reset")).raise_for_status()
        yield http


def config(url: str) -> Config:
    return parse_config(
        f"""
[providers.oa]
kind = "openai"
base_url = "{url}/v1"
api_key_env = "{KEY_ENV}"

[agent_types.gen]
provider = "oa"
system_prompt = "Write the query."
prompt_renderer = "tests.shapes_support:by_run"
retries = 0

[agent_types.racer]
kind = "python"
factory = "tests.shapes_support:Racer"
provider = "oa"

[agent_types.sleepy]
kind = "python"
factory = "tests.shapes_support:Sleepy"
provider = "oa"

[groups.sql]
levels = ["basic", "advanced", "expert"]

[pools.gen]
limits = {{ concurrency = 2, sticky_depth = 3, max_depth = 6 }}
deployments = [{{ name = "main", agent_type = "gen", replicas = 4 }}]

[pools.race]
limits = {{ concurrency = 4, max_depth = 8 }}
deployments = [{{ name = "main", agent_type = "racer", replicas = 1 }}]

[pools.sql-basic]
group = "sql"
level = "basic"
validator = "tests.shapes_support:not_hard"
deployments = [{{ name = "main", agent_type = "gen", replicas = 1 }}]

[pools.sql-advanced]
group = "sql"
level = "advanced"
deployments = [{{ name = "main", agent_type = "gen", replicas = 1 }}]

[pools.direct]
limits = {{ concurrency = 1, sticky_depth = 1, max_depth = 2 }}
deployments = [{{ name = "main", agent_type = "sleepy", replicas = 2 }}]

[pools.limited]
rate_limit = {{ requests_per_minute = 6 }}
limits = {{ concurrency = 4, max_depth = 8 }}
deployments = [{{ name = "main", agent_type = "sleepy", replicas = 1 }}]

[pools.elsewhere]
tenant = "acme"
deployments = [{{ name = "main", agent_type = "sleepy", replicas = 1 }}]
""",
        "shapes.toml",
    )


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(make_system: Any, fake_llm: Running) -> AsyncIterator[tuple[System, httpx.AsyncClient]]:
    system: System = await make_system(config(fake_llm.url))
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        yield system, http


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of an SSE body."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], msgspec.json.decode(fields["data"])))
    return out


async def test_fan_out_spreads_runs_over_agents_in_parallel_with_a_prompt_each(
    gateway: tuple[System, httpx.AsyncClient], fake: httpx.AsyncClient
) -> None:
    _system, http = gateway
    t0 = time.monotonic()
    one = await http.post("/v1/ask/gen", json={"content": "count the orders"})
    single_s = time.monotonic() - t0
    assert one.status_code == 200, one.text
    (await fake.post("/_fake/reset")).raise_for_status()

    t0 = time.monotonic()
    r = await http.post("/v1/ask/gen", json={"content": "count the orders", "n": 8, "seed": 7})
    wall_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["failed"] == [] and body["cancelled"] == []
    assert sorted(x["run"] for x in body["results"]) == list(range(8))
    assert len({x["request_id"] for x in body["results"]}) == 8
    assert len({x["thread_id"] for x in body["results"]}) == 1 == len({body["thread_id"]})
    per_agent = Counter(x["agent_id"] for x in body["results"])
    assert sorted(per_agent.values()) == [2, 2, 2, 2], per_agent
    assert wall_s < 1.5 * single_s, (wall_s, single_s)
    # each run's prompt differs: the renderer saw its run index and seed
    systems = [
        b["messages"][0]["content"] for b in (await fake.get("/_fake/stats")).json()["bodies"]["openai"]
    ]
    assert len(systems) == 8 and len(set(systems)) == 8, systems
    assert {s.split(" run=")[1].split(" ")[0] for s in systems} == {str(i) for i in range(8)}
    # the runs read the thread and left it as it was: the next message sees no earlier turn
    follow = await http.post("/v1/ask/gen", json={"content": "and then?", "thread_id": body["thread_id"]})
    assert follow.json()["content"].startswith("[0 earlier]"), follow.json()["content"]


async def test_fan_out_select_first_cancels_the_other_runs(
    gateway: tuple[System, httpx.AsyncClient], fake: httpx.AsyncClient
) -> None:
    _system, http = gateway
    r = await http.post("/v1/ask/race", json={"content": "go", "n": 4, "select": "first"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["run"] for x in body["results"]] == [0] and body["results"][0]["content"] == "first!"
    assert sorted(c["run"] for c in body["cancelled"]) == [1, 2, 3]

    async def closed() -> bool:
        stats = (await fake.get("/_fake/stats")).json()
        return bool(stats["hung_up_streams"] == 3)

    await wait_until(closed, 5, "the 3 other runs' model streams closed at the fake server")
    assert (await fake.get("/_fake/stats")).json()["requests"]["openai"] == 3


async def test_fan_out_streams_runs_tagged_and_ends_with_a_summary(
    gateway: tuple[System, httpx.AsyncClient],
) -> None:
    _system, http = gateway
    r = await http.post("/v1/ask/gen", json={"content": "list tables", "n": 3, "stream": True})
    assert r.status_code == 200, r.text
    events = sse(r.text)
    assert events[-1][0] == "done"
    assert sorted(events[-1][1]["completed"]) == [0, 1, 2]
    ends = [d for kind, d in events if kind == "end"]
    assert sorted(d["run"] for d in ends) == [0, 1, 2]
    for run in range(3):
        text = "".join(d["text"] for kind, d in events if kind == "chunk" and d["run"] == run)
        assert text == next(d["content"] for d in ends if d["run"] == run)
    starts = [d for kind, d in events if kind == "start"]
    assert len({d["request_id"] for d in starts}) == 3


async def test_fan_out_deadline_gives_the_partial_results(gateway: tuple[System, httpx.AsyncClient]) -> None:
    _system, http = gateway
    r = await http.post("/v1/ask/race", json={"content": "go", "n": 3, "timeout_s": 0.3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["run"] for x in body["results"]] == [0]
    assert [(f["run"], f["error_code"]) for f in body["failed"]] == [
        (1, "DEADLINE_EXCEEDED"),
        (2, "DEADLINE_EXCEEDED"),
    ]


async def test_fan_out_bad_input_is_a_clear_400(gateway: tuple[System, httpx.AsyncClient]) -> None:
    _system, http = gateway
    cases = [
        ({"content": "x", "n": 17}, "n"),
        ({"content": "x", "n": 0}, "n"),
        ({"content": "x", "n": 2, "webhook_url": "https://example.com/hook"}, "webhook_url"),
        ({"content": "x", "select": "first"}, "select"),
        ({"content": "x", "timeout_s": 1}, "timeout_s"),
    ]
    for body, field in cases:
        r = await http.post("/v1/ask/gen", json=body)
        assert r.status_code == 400, (body, r.text)
        assert field in r.text, (body, r.text)
    r = await http.post("/v1/ask/gen", json={"content": "x", "n": 2}, headers={"Idempotency-Key": "k-1"})
    assert r.status_code == 400 and "Idempotency-Key" in r.text


async def test_a_fan_out_counts_n_against_rate_limits_and_admission(
    gateway: tuple[System, httpx.AsyncClient],
) -> None:
    _system, http = gateway
    ok = await http.post("/v1/ask/limited", json={"content": "0", "n": 4})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 4, ok.text
    assert ok.headers["x-ratelimit-remaining"] == "2"
    refused = await http.post("/v1/ask/limited", json={"content": "0", "n": 4})
    assert (refused.status_code, refused.json()["error_code"]) == (429, "RATE_LIMIT_EXCEEDED"), refused.text
    # admission: 2 agents x max_depth 2 hold 4 runs; a fifth is refused, and the 4 are withdrawn
    saturated = await http.post("/v1/ask/direct", json={"content": "2", "n": 5})
    assert (saturated.status_code, saturated.json()["error_code"]) == (503, "POOL_SATURATED"), saturated.text

    answered: list[httpx.Response] = []

    async def room_again() -> bool:  # once the withdrawn runs are gone (cancelled, or dropped when taken)
        r = await http.post("/v1/ask/direct", json={"content": "0", "n": 4})
        answered.append(r)
        return r.status_code == 200

    await wait_until(room_again, 10, "room for 4 runs again")
    assert len(answered[-1].json()["results"]) == 4
    assert all(r.json()["error_code"] == "POOL_SATURATED" for r in answered[:-1])


async def test_escalation_goes_one_level_up_when_a_level_fails(
    gateway: tuple[System, httpx.AsyncClient], fake: httpx.AsyncClient
) -> None:
    _system, http = gateway
    (await fake.post("/_fake/faults", json={"faults": ["500"]})).raise_for_status()  # basic's one call
    r = await http.post(
        "/v1/groups/sql/ask", json={"content": "top customers", "level": "basic", "escalate": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["level"] == "advanced" and body["group"] == "sql"
    assert body["agent_id"].startswith("sql-advanced-")
    assert [(lv["level"], lv["status"]) for lv in body["levels"]] == [
        ("basic", "failed"),
        ("advanced", "completed"),
    ]
    assert body["levels"][0]["error_code"].startswith("PROVIDER")

    # without escalate it is an ask of the level's pool: its failure is the answer
    (await fake.post("/_fake/faults", json={"faults": ["500"]})).raise_for_status()
    r = await http.post("/v1/groups/sql/ask", json={"content": "top customers", "level": "basic"})
    assert r.status_code == 502 and r.json()["error_code"].startswith("PROVIDER"), r.text
    # every level failing: the last failure is the answer, with every level that ran
    (await fake.post("/_fake/faults", json={"faults": ["500", "500"]})).raise_for_status()
    r = await http.post(
        "/v1/groups/sql/ask", json={"content": "top customers", "level": "basic", "escalate": True}
    )
    assert r.status_code == 502, r.text
    assert [lv["level"] for lv in r.json()["details"]["levels"]] == ["basic", "advanced"]


async def test_escalation_on_a_rejected_answer_leaves_no_trace_of_it(
    gateway: tuple[System, httpx.AsyncClient],
) -> None:
    _system, http = gateway
    ask = {"content": "a hard one", "level": "basic", "escalate": True, "thread_id": "t-hard"}
    r = await http.post("/v1/groups/sql/ask", json=ask)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["level"] == "advanced"
    assert body["levels"][0] == {
        "level": "basic",
        "pool": "sql-basic",
        "status": "failed",
        "request_id": body["levels"][0]["request_id"],
        "error_code": "ANSWER_REJECTED",
        "error": "too hard for the basic level",
    }
    assert body["content"].startswith("[0 earlier]")  # the rejected answer is not in the thread
    # streamed: basic's events, an escalate event, then advanced's, each tagged with its level
    r = await http.post("/v1/groups/sql/ask", json={**ask, "thread_id": "t-hard-2", "stream": True})
    events = sse(r.text)
    kinds = [k for k, _ in events if k != "chunk"]
    assert kinds == ["start", "escalate", "start", "end"], kinds
    assert events[-1][1]["level"] == "advanced" and events[0][1]["level"] == "basic"
    assert events[-1][1]["levels"][0]["error_code"] == "ANSWER_REJECTED"


async def test_group_status_and_unknown_names(gateway: tuple[System, httpx.AsyncClient]) -> None:
    _system, http = gateway
    assert (
        await http.post("/v1/groups/sql/ask", json={"content": "q", "level": "advanced"})
    ).status_code == 200
    r = await http.get("/v1/groups/sql")
    assert r.status_code == 200, r.text
    levels = {lv["level"]: lv for lv in r.json()["levels"]}
    assert list(levels) == ["basic", "advanced", "expert"]
    assert levels["advanced"]["pool"] == "sql-advanced"
    assert levels["advanced"]["agents_ready"] == levels["advanced"]["agents_desired"] == 1
    assert levels["expert"]["pool"] is None
    for path, body, code in [
        ("/v1/groups/nope/ask", {"content": "q", "level": "basic"}, "GROUP_NOT_FOUND"),
        ("/v1/groups/sql/ask", {"content": "q", "level": "wizard"}, "LEVEL_NOT_FOUND"),
        ("/v1/groups/sql/ask", {"content": "q", "level": "expert"}, "LEVEL_NOT_FOUND"),
    ]:
        r = await http.post(path, json=body)
        assert (r.status_code, r.json()["error_code"]) == (404, code), r.text
    assert (await http.get("/v1/groups/nope")).status_code == 404


async def test_direct_endpoint_talks_to_that_agent_only(gateway: tuple[System, httpx.AsyncClient]) -> None:
    system, http = gateway
    agents = sorted(r.id for r in system.client.router.members("direct"))
    assert len(agents) == 2
    for agent in agents:
        for _ in range(3):
            r = await http.post(f"/v1/agents/{agent}/ask", json={"content": "0"})
            assert r.status_code == 200, r.text
            assert r.json()["agent_id"] == agent and r.json()["content"] == f"slept on {agent}"
    # full: one running, one queued (max_depth 2, concurrency 1); the third is refused at once
    target = agents[0]
    slow = [
        asyncio.create_task(http.post(f"/v1/agents/{target}/ask", json={"content": "1.5"})) for _ in range(2)
    ]

    async def busy() -> bool:
        await system.client.refresh_membership()
        return any(r.id == target and r.depth >= 1 for r in system.client.router.members("direct"))

    await wait_until(busy, 5, "the agent busy")
    refused = None
    for _ in range(3):  # the second slow one may still be on its way to the queue
        r = await http.post(f"/v1/agents/{target}/ask", json={"content": "0"})
        if r.status_code == 503:
            refused = r
            break
        assert r.status_code == 200
    assert refused is not None and refused.json()["error_code"] == "AGENT_SATURATED", refused
    assert "retry-after" in refused.headers
    assert all(t.status_code == 200 for t in await asyncio.gather(*slow))
    # unknown, or another tenant's agent: the same 404
    other = next(r.id for r in system.client.router.members("elsewhere"))
    for agent in ("direct-main-99", other, "nope"):
        r = await http.post(f"/v1/agents/{agent}/ask", json={"content": "0"})
        assert (r.status_code, r.json()["error_code"]) == (404, "AGENT_NOT_FOUND"), r.text


async def test_prefer_warm_refuses_to_wake_a_cold_pool(make_system: Any, fake_llm: Running) -> None:
    system: System = await make_system(config(fake_llm.url), start=False)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        r = await http.post("/v1/ask/gen", json={"content": "x", "pool_options": {"prefer_warm": True}})
        assert (r.status_code, r.json()["error_code"]) == (503, "POOL_COLD"), r.text
        r = await http.post(
            "/v1/ask/gen", json={"content": "x", "max_wait_s": 1, "pool_options": {"max_wait_time": 1}}
        )
        assert r.status_code == 400 and "pool_options.max_wait_time" in r.text
        r = await http.post("/v1/ask/gen", json={"content": "x", "pool_options": {"max_wait_time": 0.3}})
        assert (r.status_code, r.json()["error_code"]) == (504, "QUEUE_TIMEOUT"), r.text
