"""Metrics: exact counts after a known workload, no stuck gauge after SIGKILL, dashboards name metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agentpool.shared import metrics
from agentpool.shared.config import parse_config
from agentpool.shared.errors import ConfigError
from agentpool.shared.settings import Settings
from agentpool.workers.fleet_metrics import FleetMetrics
from agentpool.workers.supervisor import Supervisor
from tests.conftest import RUN, System, make_config, running_gateway, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
POOLS = """
[providers.quick]
kind = "fake"
ttft_ms = 5
reply_tokens = 8

[providers.slow]
kind = "fake"
ttft_ms = 300
tokens_per_s = 20
reply_tokens = 20

[agent_types.quick]
provider = "quick"
model = "quick-1"

[agent_types.slow]
provider = "slow"
model = "slow-1"

[pools.{fast}]
limits = {{ concurrency = 4, sticky_depth = 3, max_depth = 10, rescue_after_s = 30 }}

[[pools.{fast}.deployments]]
name = "main"
agent_type = "quick"
replicas = 2

[pools.{slow}.limits]
concurrency = {slow_concurrency}
sticky_depth = 1
max_depth = {slow_max_depth}
rescue_after_s = 30

[[pools.{slow}.deployments]]
name = "main"
agent_type = "slow"
replicas = 1
"""

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as http:
        r = await http.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return parse(r.text)


def pools_file(
    tmp_path: Path, tag: str, slow_concurrency: int = 1, slow_max_depth: int = 2
) -> tuple[Path, Any, str, str]:
    """A quick pool and a slow one, named uniquely per test (this process's registry outlives tests)."""
    fast, slow = f"fast{tag}-{RUN}", f"slow{tag}-{RUN}"
    text = POOLS.format(
        fast=fast, slow=slow, slow_concurrency=slow_concurrency, slow_max_depth=slow_max_depth
    )
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path, parse_config(text, str(path)), fast, slow


@contextlib.asynccontextmanager
async def supervised(system: System, path: Path) -> AsyncIterator[Supervisor]:
    """A supervisor in this loop with its metrics endpoint on a free loopback port; all replicas ready."""
    sup = Supervisor(
        replace(system.settings, config_path=str(path)), system.config, metrics=FleetMetrics(0, "127.0.0.1")
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sup.async_run(stop))
    want = sum(d.replicas for p in system.config.pools.values() for d in p.deployments)

    async def all_ready() -> bool:
        if task.done():
            task.result()
        await system.client.refresh_membership()
        return sum(len(system.client.router.members(p)) for p in system.config.pools) == want

    try:
        await wait_until(all_ready, 40, "supervised replicas ready")
        yield sup
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def sup_url(sup: Supervisor) -> str:
    assert sup.metrics is not None
    return f"http://127.0.0.1:{sup.metrics.port}/metrics"


async def ask_fast(http: httpx.AsyncClient, pool: str, i: int) -> tuple[str, dict[str, int]]:
    """One request, JSON or SSE (alternating); -> (routing tier, usage)."""
    if i % 2:
        r = await http.post(f"/v1/ask/{pool}", json={"content": f"hello {i}"})
        assert r.status_code == 200, r.text
        return r.headers["x-routing-tier"], r.json()["usage"]
    r = await http.post(f"/v1/ask/{pool}", json={"content": f"hello {i}", "stream": True})
    assert r.status_code == 200, r.text
    end = [line for line in r.text.splitlines() if line.startswith('data: {"type":"end"')]
    assert len(end) == 1, r.text
    return r.headers["x-routing-tier"], json.loads(end[0][6:])["usage"]


async def read_until(lines: AsyncIterator[str], prefix: str) -> None:
    async for line in lines:
        if line.startswith(prefix):
            return
    raise AssertionError(f"stream ended before {prefix!r}")


async def test_counts_match_a_known_workload(make_system, tmp_path: Path) -> None:
    path, config, fast, slow = pools_file(tmp_path, "a")
    system: System = await make_system(config, start=False)
    async with (
        supervised(system, path) as sup,
        running_gateway(system.settings, config) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        sse_before = total(await scrape(f"{url}/metrics"), "agentpool_gateway_sse_streams_open")
        # Given 50 answered requests to the quick pool, 10 at a time
        gate = asyncio.Semaphore(10)

        async def one(i: int) -> tuple[str, dict[str, int]]:
            async with gate:
                return await ask_fast(http, fast, i)

        answers = await asyncio.gather(*(one(i) for i in range(50)))
        tiers = collections.Counter(t for t, _ in answers)
        assert set(tiers) <= set(metrics.TIERS), tiers
        # And a slow pool saturated: one request running, one waiting, then three refused with 503
        async with http.stream("POST", f"/v1/ask/{slow}", json={"content": "a", "stream": True}) as a:
            a_lines = a.aiter_lines()
            await read_until(a_lines, "event: start")
            async with http.stream("POST", f"/v1/ask/{slow}", json={"content": "b", "stream": True}) as b:
                assert b.status_code == 200
                for _ in range(3):
                    r = await http.post(f"/v1/ask/{slow}", json={"content": "refused"})
                    assert r.status_code == 503 and r.json()["error_code"] == "POOL_SATURATED", r.text

                async def two_open() -> bool:
                    gw = await scrape(f"{url}/metrics")
                    return total(gw, "agentpool_gateway_sse_streams_open") == sse_before + 2

                await wait_until(two_open, 10, "gauge of open SSE streams = 2")
                await read_until(a_lines, "event: end")
                await read_until(b.aiter_lines(), "event: end")

        # Then the gateway counted every publish by tier and every 503, exactly
        gw = await scrape(f"{url}/metrics")
        for tier, n in tiers.items():
            assert total(gw, "agentpool_requests_routed_total", pool=fast, tier=tier) == n, tier
        assert total(gw, "agentpool_requests_routed_total", pool=fast) == 50
        assert total(gw, "agentpool_requests_routed_total", pool=slow, tier="rejected") == 3
        assert total(gw, "agentpool_requests_routed_total", pool=slow) == 5
        assert total(gw, "agentpool_pool_replicas_ready", pool=fast) == 2

        async def sse_closed() -> bool:
            return total(await scrape(f"{url}/metrics"), "agentpool_gateway_sse_streams_open") == sse_before

        await wait_until(sse_closed, 10, "SSE streams gauge back to where it was")
        # And the supervisor's one endpoint sums both replicas of each pool, exactly
        await check_workers(sup_url(sup), fast, slow, answers)


async def check_workers(url: str, fast: str, slow: str, answers: list[tuple[str, dict[str, int]]]) -> None:
    want = {
        ("agentpool_requests_total", fast, "end"): 50,
        ("agentpool_requests_total", slow, "end"): 2,
        ("agentpool_request_duration_seconds_count", fast, ""): 50,
        ("agentpool_queue_wait_seconds_count", fast, ""): 50,
        ("agentpool_time_to_first_token_seconds_count", fast, ""): 50,
        ("agentpool_request_duration_seconds_count", slow, ""): 2,
        ("agentpool_input_tokens_total", fast, ""): sum(u["input_tokens"] for _, u in answers),
        ("agentpool_output_tokens_total", fast, ""): sum(u["output_tokens"] for _, u in answers),
        ("agentpool_in_flight", fast, ""): 0,
        ("agentpool_in_flight", slow, ""): 0,
        ("agentpool_replicas_desired", fast, ""): 2,
        ("agentpool_replicas_actual", fast, ""): 2,
        ("agentpool_replicas_actual", slow, ""): 1,
        ("agentpool_replica_cold_starts_total", fast, ""): 2,
        ("agentpool_replica_warmup_seconds_count", fast, ""): 2,
        ("agentpool_redeliveries_total", fast, ""): 0,
    }
    got: dict[tuple[str, str, str], float] = {}

    async def settled() -> bool:  # the last answer's counts are written just after its end event
        samples = await scrape(url)
        for key in want:
            name, pool, outcome = key
            got[key] = total(samples, name, pool=pool, **({"outcome": outcome} if outcome else {}))
        return got == want

    with contextlib.suppress(AssertionError):
        await wait_until(settled, 10, "worker metrics settled")
    assert got == want
    samples = await scrape(url)
    inf = total(samples, "agentpool_request_duration_seconds_bucket", pool=fast, le="+Inf")
    assert inf == 50
    assert total(samples, "agentpool_input_tokens_total", pool=fast, model="quick-1", provider="fake") > 0


async def test_killed_worker_leaves_no_in_flight(make_system, tmp_path: Path) -> None:
    path, config, _, slow = pools_file(tmp_path, "k", slow_concurrency=2, slow_max_depth=10)
    system: System = await make_system(config, start=False)
    async with supervised(system, path) as sup:
        url = sup_url(sup)
        # Given two requests running on the one slow replica
        streams = [system.client.stream(slow, f"long {i}", thread_id=f"kill-{i}") for i in range(2)]
        for s in streams:
            assert type(await anext(s)).__name__ == "Start"

        async def in_flight(n: int) -> bool:
            return total(await scrape(url), "agentpool_in_flight", pool=slow) == n

        await wait_until(lambda: in_flight(2), 10, "in flight = 2")
        replica = next(r for r in sup.replicas.values() if r.pool == slow)
        pid = replica.pid
        # When its process is SIGKILLed
        os.kill(pid, signal.SIGKILL)
        # Then its live gauge files go, both requests are redelivered and answered, and the sum returns to 0
        assert sup.metrics is not None and sup.metrics.dir is not None
        gone = lambda: not list(Path(sup.metrics.dir).glob(f"gauge_live*_{pid}.db"))  # noqa: E731
        await wait_until(gone, 15, "dead worker's live gauges removed")
        ends = await asyncio.gather(*(asyncio.wait_for(last_event(s), 60) for s in streams))
        assert [type(e).__name__ for e in ends] == ["End", "End"]
        await wait_until(lambda: in_flight(0), 10, "in flight = 0 after the restart")
        samples = await scrape(url)
        assert total(samples, "agentpool_redeliveries_total", pool=slow) == 2
        assert total(samples, "agentpool_replica_exits_total", pool=slow) == 1
        assert total(samples, "agentpool_replica_cold_starts_total", pool=slow) == 2
        assert total(samples, "agentpool_requests_total", pool=slow, outcome="end") == 2


async def last_event(stream: AsyncIterator[Any]) -> Any:
    events = [e async for e in stream]
    return events[-1]


async def test_log_lines_and_start_event_carry_trace(make_system, caplog: pytest.LogCaptureFixture) -> None:
    system: System = await make_system(replicas=1)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    caplog.set_level(logging.DEBUG, logger="agentpool.worker")
    async with running_gateway(system.settings, system.config) as url, httpx.AsyncClient(base_url=url) as h:
        r = await h.post(
            "/v1/ask/p",
            json={"content": "secret-ish words", "thread_id": "trace-1", "stream": True},
            headers={"traceparent": trace},
        )
        assert r.status_code == 200, r.text
    lines = r.text.splitlines()
    start = next(json.loads(line[6:]) for line in lines if line.startswith('data: {"type":"start"'))
    assert start["traceparent"] == trace
    rid = start["request_id"]

    def mine() -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if getattr(rec, "request_id", None) == rid]

    await wait_until(lambda: bool(mine()), 5, "the worker's log line for the request")
    rec = mine()[0]
    fields = tuple(getattr(rec, k) for k in ("thread_id", "pool", "replica", "traceparent"))
    assert fields == ("trace-1", "p", "p-main-1", trace)
    loud = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO]
    assert not [m for m in loud if "secret-ish" in m]


async def test_metrics_can_be_switched_off() -> None:
    from agentpool.gateway.app import create_app

    app = create_app(Settings(), make_config())
    metrics.routed("p", "sticky")  # a labelled counter shows once a label set has been seen
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        on = await http.get("/metrics")
        assert on.status_code == 200 and "agentpool_requests_routed_total" in on.text
        metrics.configure(False)
        try:
            off = await http.get("/metrics")
            metrics.routed("p", "sticky")  # a no-op, not an error
        finally:
            metrics.configure(True)
    assert off.status_code == 404 and off.json()["error"].startswith("metrics are disabled")
    assert Settings.from_env({"AGENTPOOL_METRICS": "0"}).metrics is False
    assert Settings.from_env({}).metrics is True
    with pytest.raises(ConfigError, match="AGENTPOOL_METRICS"):
        Settings.from_env({"AGENTPOOL_METRICS": "maybe"})


# --- dashboards and alerts name metrics that exist
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors ([5m], [$__rate_interval])
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if m.group().lower() in _KEYWORDS or expr[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    panels = list(dashboard["panels"])
    for p in list(panels):
        panels += p.get("panels", [])  # rows may nest panels
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_promql_parser_finds_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, pool) (rate(agentpool_x_bucket{pool=~"$pool", le!="1"}'
        "[$__rate_interval]))) / on (pool) group_left sum(agentpool_y) > bool 0 or vector(1)"
    )
    assert promql_metrics(expr) == {"agentpool_x_bucket", "agentpool_y"}


def test_dashboard_queries_name_registered_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/agentpool.json").read_text())
    known = metrics.sample_names()
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    for expr in queries:
        names = promql_metrics(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{expr!r} names unknown metrics {sorted(names - known)}"
    for var in dashboard["templating"]["list"]:
        name = re.match(r"label_values\((\w+),", var["definition"])
        assert name and name.group(1) in known, var["definition"]


def test_alert_rules_name_registered_metrics() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    known = metrics.sample_names()
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 4
    for expr in exprs:
        names = promql_metrics(expr)
        assert names and names <= known, f"{expr!r} names unknown metrics {sorted(names - known)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (apt-get install prometheus)")
def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path: Path) -> None:
    """Prometheus's own parser: the config, the alert rules and their unit tests, every dashboard query."""
    prom = ROOT / "deploy/prometheus"
    for args in (["check", "config", prom / "prometheus.yml"], ["test", "rules", prom / "alerts_test.yml"]):
        done = subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/agentpool.json").read_text())
    grafana = {"$__rate_interval": "5m", "$pool": ".*"}
    rules = [
        {"record": f"dashboard:query{i}", "expr": re.sub(r"\$\w+", lambda m: grafana[m.group()], e)}
        for i, e in enumerate(dashboard_queries(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
