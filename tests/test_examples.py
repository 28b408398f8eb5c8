"""The examples under ``examples/``, run as their pools files say.

Workers run in this process on real RabbitMQ and Redis, with the examples' real tools, prompt
renderer, factory and MCP server; the model is the in-process fake, which calls a tool when the
user writes ``@name {json}`` and then answers with the tool's result verbatim.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest

from agentpool.agent import Setup
from agentpool.shared.config import AgentType, Config, load_config, parse_config
from agentpool.shared.errors import Interrupted
from agentpool.shared.fake_model import input_tokens
from agentpool.shared.messages import Chunk, End, Event, Message, Request, Step, ToolCall, ToolResult
from agentpool.workers.prompting import default_renderer
from agentpool.workers.providers.base import Prompt
from agentpool.workers.tools.functions import load_function_tool
from examples.sql_agent import agent as sql_agent
from examples.sql_agent import make_db, tools
from examples.team import agent as team_agent
from tests.conftest import System, wait_until

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SQL = EXAMPLES / "sql_agent" / "pools.toml"
TEAM = EXAMPLES / "team" / "pools.toml"
MCP = EXAMPLES / "mcp_support" / "pools.toml"
TABLES = ["customers", "order_items", "orders", "products"]
MakeSystem = Callable[..., Awaitable[System]]
FAST_TEAM = [("build_s = 2.5", "build_s = 0.5"), ("replicas = 2", "replicas = 1")]


def variant(path: Path, swaps: list[tuple[str, str]]) -> Config:
    """The pools file at ``path`` with each ``old`` text replaced by ``new`` (which must be there)."""
    text = path.read_text(encoding="utf-8")
    for old, new in swaps:
        assert old in text, f"{path.name} no longer says {old!r}"
        text = text.replace(old, new)
    return parse_config(text, str(path))


async def collect(system: System, pool: str, content: str, **kw: object) -> list[Event]:
    return [e async for e in system.client.stream(pool, content, **kw)]


def final(events: list[Event]) -> End:
    end = events[-1]
    assert isinstance(end, End), end
    return end


def tool_result(events: list[Event], name: str) -> ToolResult:
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.name for r in results] == [name], results
    return results[0]


async def ask_tool(system: System, name: str, arguments: dict[str, object], text: str = "") -> list[Event]:
    return await collect(system, "sql", f"{text} @{name} {json.dumps(arguments)}".strip())


def request(request_id: str, content: str = "How many orders are there?") -> Request:
    return Request(
        request_id=request_id, pool="sql", tenant="default", thread_id="t", content=content, created_at=0.0
    )


# -- every example ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "pool", "kind"), [(SQL, "sql", "chat"), (TEAM, "team", "python"), (MCP, "support-mcp", "chat")]
)
def test_each_pools_file_loads(path: Path, pool: str, kind: str) -> None:
    config = load_config(path)
    (deployment,) = config.pools[pool].deployments
    assert config.agent_types[deployment.agent_type].kind == kind


# -- the SQL agent ---------------------------------------------------------------------------------


def test_the_committed_database_is_what_make_db_builds(tmp_path: Path) -> None:
    built = make_db.build(tmp_path / "shop.db")
    dumps = []
    for path in (tools.DB_PATH, built):
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            dumps.append(list(conn.iterdump()))
    assert dumps[0] == dumps[1]
    assert len([line for line in dumps[0] if line.startswith('INSERT INTO "orders"')]) == 12


def test_the_sql_tools_have_schemas_from_their_docstrings() -> None:
    specs = {
        p.rsplit(":", 1)[1]: load_function_tool(p).spec for p in load_config(SQL).agent_types["sql"].tools
    }
    assert sorted(specs) == ["describe_table", "list_tables", "run_query"]
    query = specs["run_query"].parameters
    assert query["required"] == ["sql"] and query["properties"]["limit"]["default"] == 50
    assert "SELECT" in query["properties"]["sql"]["description"]


async def test_the_sql_agent_lists_describes_and_queries(make_system: MakeSystem) -> None:
    system: System = await make_system(load_config(SQL))
    # When the model lists the tables, Then the answer names each one
    events = await ask_tool(system, "list_tables", {}, "What is in the database?")
    listed = tool_result(events, "list_tables")
    assert json.loads(listed.content) == TABLES
    assert all(t in final(events).content for t in TABLES)
    # When it describes one: columns with types and references, and three sample rows
    described = json.loads(
        tool_result(await ask_tool(system, "describe_table", {"table": "orders"}), "describe_table").content
    )
    assert [(c["name"], c["type"]) for c in described["columns"]] == [
        ("id", "INTEGER"), ("customer_id", "INTEGER"), ("ordered_at", "TEXT"), ("status", "TEXT")
    ]  # fmt: skip
    assert described["columns"][1]["references"] == "customers.id"
    assert described["sample_rows"][0] == [1001, 1, "2025-05-02", "delivered"]
    assert len(described["sample_rows"]) == 3
    # When it runs a SELECT with a join, Then the rows come back and the answer quotes them
    sql = (
        "SELECT c.name, COUNT(*) AS n FROM customers c JOIN orders o ON o.customer_id = c.id "
        "GROUP BY c.id ORDER BY n DESC, c.name LIMIT 3"
    )
    events = await ask_tool(system, "run_query", {"sql": sql}, "Who orders most?")
    result = tool_result(events, "run_query")
    assert not result.is_error, result
    assert json.loads(result.content) == {
        "columns": ["name", "n"],
        "rows": [["Ada Lovelace", 2], ["Grace Hopper", 2], ["Alan Turing", 1]],
        "truncated": False,
    }
    assert result.content in final(events).content
    # And a limit caps the rows, saying so
    capped = tool_result(
        await ask_tool(system, "run_query", {"sql": "SELECT id FROM products ORDER BY id", "limit": 5}),
        "run_query",
    )
    assert json.loads(capped.content) == {
        "columns": ["id"],
        "rows": [[1], [2], [3], [4], [5]],
        "truncated": True,
    }


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("UPDATE products SET price_cents = 0", "only SELECT (or WITH ... SELECT) queries run, not UPDATE"),
        ("DELETE FROM orders WHERE id = 1001", "only SELECT (or WITH ... SELECT) queries run, not DELETE"),
        ("SELECT * FROM customers; DROP TABLE customers", "one statement per query"),
        ("WITH old AS (SELECT id FROM orders) DELETE FROM orders WHERE id IN old", "not a plain read"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "not ATTACH"),
    ],
)
async def test_the_sql_agent_refuses_writes_and_the_database_stays_unchanged(
    make_system: MakeSystem, sql: str, why: str
) -> None:
    db = tools.DB_PATH
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    system: System = await make_system(variant(SQL, [("replicas = 2", "replicas = 1")]))
    # When the model tries to write
    events = await ask_tool(system, "run_query", {"sql": sql}, "Tidy up the data.")
    # Then the tool refuses with an error result the model hears, and nothing changed on disk
    result = tool_result(events, "run_query")
    assert result.is_error and result.error_code == "TOOL_ERROR", result
    assert result.content.startswith("ValueError: ") and why in result.content, result.content
    assert result.content in final(events).content
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    assert not list(db.parent.glob("shop.db-*"))  # no journal either
    assert tools.run_query("SELECT COUNT(*) FROM orders")["rows"] == [[12]]


def test_the_renderer_shuffles_the_schema_per_request_id() -> None:
    agent_type = load_config(SQL).agent_types["sql"]
    history = [Message("user", "hi"), Message("assistant", "hello")]
    one, two, again = (sql_agent.render(agent_type, request(rid), history) for rid in ("r-1", "r-2", "r-1"))
    # Each lists every table, in an order of its own; the same request id renders the same prompt
    orders = [sql_agent.table_order(p.system) for p in (one, two)]
    assert sorted(orders[0]) == sorted(orders[1]) == TABLES
    assert orders[0] != orders[1], orders
    assert again == one
    # Otherwise it renders like the default renderer
    default = default_renderer(agent_type, request("r-1"), history)
    assert one.messages == default.messages
    assert one.system.startswith(default.system)
    assert "order_items(order_id INTEGER -> orders.id, product_id INTEGER -> products.id" in one.system


async def test_parallel_runs_of_the_sql_agent_see_differently_shuffled_schemas(
    make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two request ids whose shuffles differ, and a record of what the worker's renderer made
    agent_type = load_config(SQL).agent_types["sql"]

    def order(rid: str) -> list[str]:
        return sql_agent.table_order(sql_agent.render(agent_type, request(rid), []).system)

    first = uuid.uuid4().hex
    second = next(rid for rid in (uuid.uuid4().hex for _ in range(100)) if order(rid) != order(first))
    expected = {first: order(first), second: order(second)}
    rendered: dict[str, list[str]] = {}
    real = sql_agent.render

    def recording(at: AgentType, req: Request, history: list[Message]) -> Prompt:
        prompt = real(at, req, history)
        rendered[req.request_id] = sql_agent.table_order(prompt.system)
        return prompt

    monkeypatch.setattr(sql_agent, "render", recording)
    system: System = await make_system(load_config(SQL))
    # When both run at once on the pool
    ends = await asyncio.gather(
        *(system.client.ask("sql", "How many orders are there?", request_id=r) for r in expected)
    )
    # Then each run's prompt listed the tables in its own order, and the model saw different prompts
    assert rendered == expected
    assert ends[0].content != ends[1].content


# -- the team agent --------------------------------------------------------------------------------


def test_the_team_splits_a_request_into_at_most_three_tasks_and_routes_them() -> None:
    assert team_agent.split_tasks("Refund my order and fix the app. Where is my parcel? Also hi. Bye.") == [
        "Refund my order",
        "fix the app.",
        "Where is my parcel? Also hi. Bye.",
    ]
    assert team_agent.split_tasks("hello") == ["hello"]
    assert [team_agent.route(t).name for t in ("I want a refund", "track my parcel", "the app crashes")] == [
        "billing",
        "shipping",
        "tech",
    ]
    assert team_agent.route("what a lovely day").name == "general"


async def test_the_team_factory_runs_once_and_before_the_replica_is_ready(
    make_system: MakeSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the team pools file as it is (build_s = 2.5), and a count of factory calls
    config = load_config(TEAM)
    build_s = float(config.agent_types["team"].options["build_s"])
    builds: list[str] = []
    real = team_agent.build

    def counting_build(setup: Setup) -> team_agent.TeamAgent:
        builds.append(setup.replica_id)
        return real(setup)

    monkeypatch.setattr(team_agent, "build", counting_build)
    system: System = await make_system(config, start=False)
    worker = await system.start_worker("team", "main", 1, wait=False)
    # While it builds, the replica heartbeats as starting and takes no work
    await wait_until(lambda: worker.info.heartbeat_at > 0, 5, "first heartbeat")
    assert worker.info.status == "starting" and not worker.ready.is_set()
    await asyncio.wait_for(worker.ready.wait(), 15)
    assert worker.info.build_ms >= build_s * 1000, worker.info.build_ms
    await system.wait_members("team")
    # When requests come, Then the warm team answers each far faster than it took to build
    for i in range(3):
        end = await system.client.ask("team", f"Please refund order {i} and track my parcel.", thread_id="th")
        assert end.timings.total_ms < build_s * 1000 / 2, end.timings
    assert builds == [worker.replica_id]


async def test_the_team_hands_each_task_to_a_specialist_and_sums_every_call(
    make_system: MakeSystem,
) -> None:
    config = variant(TEAM, FAST_TEAM)
    system: System = await make_system(config)
    content = "I was charged twice on my last invoice. The parcel never arrived and the app crashes at login."
    events = await collect(system, "team", content)
    steps = [e for e in events if isinstance(e, Step)]
    # Then: a plan, one hand-off per sub-task to the specialist it is about, then their reports
    assert [s.name for s in steps] == ["plan", *["handoff"] * 3, *["report"] * 3]
    assert [s.data for s in steps if s.name == "handoff"] == [
        {"to": "billing", "task": "I was charged twice on my last invoice."},
        {"to": "shipping", "task": "The parcel never arrived"},
        {"to": "tech", "task": "the app crashes at login."},
    ]
    assert [s.data["from"] for s in steps if s.name == "report"] == ["billing", "shipping", "tech"]
    # And the synthesis streams after them
    end = final(events)
    first_chunk = next(i for i, e in enumerate(events) if isinstance(e, Chunk))
    assert first_chunk > events.index(steps[-1])
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == end.content
    assert [s.name for s in end.steps if isinstance(s, Step)] == [s.name for s in steps]
    assert not any(isinstance(s, ToolCall) for s in end.steps)
    # And end.usage sums five model calls: the plan, three specialists, the synthesis
    reply_tokens = config.providers["fake"].reply_tokens
    assert end.usage.output_tokens == 5 * reply_tokens, end.usage
    plan_alone = input_tokens(team_agent.PLANNER.system, [Message("user", content)])
    assert end.usage.input_tokens > 3 * plan_alone, end.usage


# -- the MCP support agent -------------------------------------------------------------------------


async def test_the_support_agent_looks_an_order_up_over_mcp(make_system: MakeSystem) -> None:
    system: System = await make_system(load_config(MCP))
    (worker,) = system.workers.values()
    assert sorted(worker.toolbox.tools) == ["lookup_order", "refund_order"]
    # When the model calls the MCP server's tool
    events = await collect(system, "support-mcp", 'Where is my order? @lookup_order {"order_id": "A1001"}')
    call = next(e for e in events if isinstance(e, ToolCall))
    assert call.name == "lookup_order" and call.arguments == {"order_id": "A1001"}
    result = tool_result(events, "lookup_order")
    # Then the server's answer comes back, and the agent's answer carries the order's status
    assert not result.is_error, result
    assert json.loads(result.content)["status"] == "shipped"
    assert "shipped" in final(events).content
    # And an unknown order is an error result the model hears
    events = await collect(system, "support-mcp", '@lookup_order {"order_id": "Z9999"}')
    missing = tool_result(events, "lookup_order")
    assert missing.is_error and "no order with id 'Z9999'" in missing.content, missing
    assert missing.content in final(events).content


async def test_a_refund_waits_for_a_human_and_goes_on_when_approved(make_system: MakeSystem) -> None:
    from examples.mcp_support import refunds

    system: System = await make_system(load_config(MCP))
    refunds.REFUNDS.clear()
    ask = 'Refund it please. @refund_order {"order_id": "A1001", "amount_cents": 1299}'
    # When the model asks for the refund, the run pauses before the tool runs
    with pytest.raises(Interrupted) as caught:
        await system.client.ask("support-mcp", ask, thread_id="desk-1")
    paused = caught.value.interrupt
    assert paused.tool_call.name == "refund_order" and refunds.REFUNDS == []
    # Then a human's approval runs it once, and the answer says so
    end = await system.client.resume(paused.request_id, approve=True)
    assert refunds.REFUNDS == [("A1001", 1299)]
    assert "refunded 12.99 on order A1001" in end.content
