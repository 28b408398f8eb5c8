"""``/openapi.json`` matches the gateway: schemathesis fuzzes every operation with a valid key.

Positive and negative cases go to a real gateway (workers on the fake model); each answer must not
be a 5xx and must conform to the document: status code, content type, headers, body schema, and
invalid input must be refused with a 4xx. ``webhook_url`` is left out of the generated bodies so
no generated URL is ever resolved or called (tests/test_webhooks.py covers it).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api_helpers import h, make_key, tenant_config
from tests.conftest import System, running_gateway

pytestmark = pytest.mark.timeout(150)

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _fuzzable(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["components"]["schemas"]["AskBody"]["properties"].pop("webhook_url")
    doc["paths"].pop("/v1/fleet/events")  # endless by design: each call would wait out its timeout
    for body in ("ChatCompletionBody", "MessagesBody"):  # model names the pool: the real one, mostly
        doc["components"]["schemas"][body]["properties"]["model"] = {"enum": ["pa", "nope"]}
    for path in ("/v1/chat/completions", "/v1/messages"):  # the documented example, on the real pool
        doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]["model"] = "pa"
    return doc


def _runner(op: Any, mode: GenerationMode, target: Target, counts: Counter[str]) -> Any:
    """A Hypothesis test of one operation in one generation mode."""
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    fixed = target.fixed.get(op.path, {})
    label = f"{op.method.upper()} {op.path}{' ' + str(fixed) if fixed else ''} {mode.value}"
    examples = EXAMPLES[mode] * (2 if fixed else 1)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode, path_parameters=fixed or None))
    def run(case: Any) -> None:
        auth = {**h(target.key), "Authorization": f"Bearer {target.key}"}  # both schemes, one key
        response = case.call(base_url=target.base_url, headers=auth, timeout=30)
        case.validate_response(response, checks=checks, headers=auth)
        counts[f"{label} -> {response.status_code}"] += 1

    return run


@dataclass
class Target:
    base_url: str
    key: str
    fixed: dict[str, dict[str, str]]  # path -> path parameters that exist (a real pool, request id)


def _fuzz(doc: dict[str, Any], target: Target) -> Counter[str]:
    """Every operation in both modes, with random path parameters and with real ones."""
    schema = schemathesis.openapi.from_dict(_fuzzable(doc))
    counts: Counter[str] = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        variants = [Target(target.base_url, target.key, {})]
        if op.path in target.fixed:
            variants.append(target)
        for variant, mode in itertools.product(variants, EXAMPLES):
            try:
                _runner(op, mode, variant, counts)()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, op.path
    return counts


async def test_openapi_document_describes_the_api(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}), start=False)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        r = await http.get("/openapi.json")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        doc = r.json()
    assert doc["openapi"].startswith("3.1")
    ask = doc["paths"]["/v1/ask/{pool}"]["post"]
    assert {"200", "202", "400", "401", "403", "404", "413", "422", "429", "503", "504"} <= set(
        ask["responses"]
    )
    assert set(ask["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "Retry-After" in ask["responses"]["429"]["headers"]
    assert "X-RateLimit-Remaining" in ask["responses"]["200"]["headers"]
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error", "error_code"]
    assert "webhook_url" in doc["components"]["schemas"]["AskBody"]["properties"]
    assert "result" in doc["webhooks"]


async def test_schemathesis_finds_no_5xx_and_no_schema_violation(make_system) -> None:
    system: System = await make_system(config=tenant_config(pools={"pa": "default"}))
    _, key = await make_key(system, "default", "ask", "admin", rpm=0)
    async with (
        running_gateway(system.settings, system.config) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        doc = (await http.get("/openapi.json")).json()
        rid = (await http.post("/v1/ask/pa", json={"content": "seed"}, headers=h(key))).json()["request_id"]
        fixed = {"/v1/ask/{pool}": {"pool": "pa"}, "/v1/requests/{request_id}": {"request_id": rid}}
        counts = await asyncio.to_thread(_fuzz, doc, Target(url, key, fixed))
    total = sum(counts.values())
    print(f"\nschemathesis: {total} cases")
    for label, n in sorted(counts.items()):
        print(f"  {n:4d}  {label}")
    # the real pool and request were reached, and answered in every documented way that matters
    assert counts["POST /v1/ask/{pool} {'pool': 'pa'} positive -> 200"] > 10, counts
    assert counts[f"GET /v1/requests/{{request_id}} {{'request_id': '{rid}'}} positive -> 200"] > 10, counts
    assert counts["POST /v1/chat/completions positive -> 200"] >= 1, counts  # most are refused: last
    assert counts["POST /v1/messages positive -> 200"] >= 1, counts  # message not the user's, ...
    assert total >= 500, counts
