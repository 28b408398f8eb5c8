"""``GET /openapi.json``: the OpenAPI 3.1 document, schemas generated from ``gateway/schemas.py``.

Paths are written out here, with every status code, header and media type the handlers really
produce; the fuzz test (tests/test_openapi_fuzz.py) holds the gateway to this document.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from agentpool.broker.config_source import ConfigStatus
from agentpool.broker.fleet import Health, PoolStatus
from agentpool.gateway import admin, dashboard, shapes
from agentpool.gateway import anthropic_compat as an
from agentpool.gateway import openai_compat as oa
from agentpool.gateway import schemas as s
from agentpool.shared import messages as m

VERSION = "1.0.0"
_TYPES = [
    s.AskBody,
    s.AskResponse,
    s.FanOutResponse,
    s.GroupAskBody,
    s.GroupAnswer,
    shapes.GroupStatus,
    s.ResumeBody,
    s.Accepted,
    s.Running,
    s.Cancelling,
    s.ErrorBody,
    s.WebhookPayload,
    s.KeyList,
    s.Revoked,
    s.WebhookSecret,
    m.Start,
    m.Chunk,
    m.Restart,
    m.ToolCall,
    m.ToolResult,
    m.Step,
    m.End,
    m.Interrupt,
    m.Error,
    oa.ChatCompletionBody,
    an.MessagesBody,
    admin.ScaleBody,
    admin.PoolSummary,
    PoolStatus,
    Health,
    dashboard.FleetView,
    ConfigStatus,
]  # m.*: SSE event data
_EVENTS = ("start", "chunk", "restart", "tool_call", "tool_result", "step", "end", "interrupt", "error")
_EVENT_TYPES = ("Start", "Chunk", "Restart", "ToolCall", "ToolResult", "Step", "End", "Interrupt", "Error")
_REF = "#/components/schemas/{name}"
_ERROR_TEXT = {
    400: "Bad input (INVALID_JSON, VALIDATION_ERROR, WEBHOOK_URL_REFUSED, ...)",
    401: "No API key, or an unknown, malformed or revoked one (INVALID_API_KEY)",
    403: "The API key lacks the scope this endpoint needs (FORBIDDEN)",
    404: "Unknown, or another tenant's (POOL_NOT_FOUND, REQUEST_NOT_FOUND, KEY_NOT_FOUND, GROUP_NOT_FOUND, "
    "LEVEL_NOT_FOUND, AGENT_NOT_FOUND, NOT_FOUND)",
    405: "Method not allowed (METHOD_NOT_ALLOWED)",
    409: "Not in a state that allows it (NOT_WAITING, ALREADY_RESUMED, THREAD_WAITING)",
    413: "Body larger than 256 KiB (PAYLOAD_TOO_LARGE)",
    422: "Idempotency-Key reused with another body (IDEMPOTENCY_CONFLICT), or the level's validator "
    "rejected the answer (ANSWER_REJECTED)",
    429: "Rate limit exceeded (RATE_LIMIT_EXCEEDED); see Retry-After",
    499: "The request was cancelled (CANCELLED)",
    502: "The generation failed; error_code is the provider's or the worker's",
    503: "Pool or agent saturated, a cold pool with prefer_warm, or a dependency unreachable "
    "(POOL_SATURATED, AGENT_SATURATED, POOL_COLD, REDIS_UNAVAILABLE, ...)",
    504: "No agent started the request within max_wait_s (QUEUE_TIMEOUT), or the run took longer "
    "than its run_timeout_s (RUN_TIMEOUT)",
}
_INT = {"type": "integer", "minimum": 0}
_SSE_EVENT = {  # one event of the stream (": keep-alive" comment lines carry none)
    "type": "object",
    "required": ["id", "event", "data"],
    "description": "start, then chunk, tool_call, tool_result and step events, then end, error, or "
    "interrupt (the run waits for approval); restart when a new attempt begins; id is a Redis "
    "stream entry id, usable as Last-Event-ID",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
        "event": {"enum": list(_EVENTS)},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"oneOf": [{"$ref": _REF.format(name=n)} for n in _EVENT_TYPES]},
        },
    },
}
_SSE_SHAPED = {  # a fan-out's or a group ask's stream
    "type": "object",
    "required": ["event", "data"],
    "description": "n > 1: every run's events, each data tagged with its run, then done (which runs "
    "completed, failed, were cancelled). A group ask: each level's events tagged with its level, an "
    "escalate event between a failed level and the next; end carries levels",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
        "event": {"enum": [*_EVENTS, "done", "escalate"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_STR = {"type": "string"}
RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests per minute of the most restrictive limit", "schema": _INT},
    "X-RateLimit-Remaining": {"description": "Requests left before that limit refuses", "schema": _INT},
    "X-RateLimit-Reset": {"description": "Seconds until that limit is fully replenished", "schema": _INT},
}
_REQUEST_HEADERS = {
    "X-Request-ID": {"schema": _STR},
    "X-Thread-ID": {"schema": _STR},
    "X-Routing-Tier": {"description": "sticky, spill, overflow, queued, or replay", "schema": _STR},
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": _INT}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _error(status: int, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": _ERROR_TEXT[status],
        "content": {"application/json": {"schema": _ref("ErrorBody")}},
    }
    if headers:
        out["headers"] = headers
    return out


def _errors(*statuses: int, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    retry = {429, 503}
    return {str(c): _error(c, {**(headers or {}), **(_RETRY_AFTER if c in retry else {})}) for c in statuses}


def _json(name: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(name)}},
    }
    if headers:
        out["headers"] = headers
    return out


def _answer(description: str, headers: dict[str, Any], *also: str) -> dict[str, Any]:
    """200 as JSON, or SSE with ``Accept: text/event-stream``; ``also``: other answer shapes (a
    fan-out's, a group's)."""
    out = _json("AskResponse", description, headers)
    if also:  # anyOf: a group's answer is an answer too
        out["content"]["application/json"]["schema"] = {"anyOf": [_ref(n) for n in also]}
    sse = {"anyOf": [_SSE_EVENT, _SSE_SHAPED]} if also else _SSE_EVENT
    out["content"]["text/event-stream"] = {"schema": sse}
    return out


_FAN_OUT_HEADERS = {
    "X-Request-IDs": {"description": "n > 1: the runs' request ids, comma-separated", "schema": _STR},
}


def _ask(
    op: str = "ask",
    summary: str = "Ask a pool (JSON, SSE, or webhook; n > 1: a best-of-N fan-out)",
    param: str = "pool",
    body: str = "AskBody",
    answers: tuple[str, ...] = ("AskResponse", "FanOutResponse"),
) -> dict[str, Any]:
    ok_headers = {**_REQUEST_HEADERS, **RATE_HEADERS, **_FAN_OUT_HEADERS}
    return {
        "post": {
            "operationId": op,
            "summary": summary,
            "parameters": [
                {"name": param, "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "Same key + same body within 24 h returns the first request's answer",
                    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,256}$"},
                },
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
            "responses": {
                "200": _answer("The answer (JSON), or its event stream", ok_headers, *answers),
                "202": _json(
                    "Accepted",
                    "Webhook mode: the result will be POSTed to webhook_url",
                    {**ok_headers, "Location": {"schema": _STR}},
                ),
                **_errors(400, 401, 403, 404, 409, 413, 422, 502, 504, headers=RATE_HEADERS),
                **_errors(429, 503, headers=RATE_HEADERS),
            },
        }
    }


def _resume() -> dict[str, Any]:
    headers = {
        "X-Request-ID": {"description": "The continuation's request id", "schema": _STR},
        "X-Thread-ID": {"schema": _STR},
        "X-Resumed-From": {"description": "The paused request", "schema": _STR},
    }
    return {
        "post": {
            "operationId": "resumeRequest",
            "summary": "Approve or deny the tool call a paused run waits for; the run goes on",
            "parameters": [
                {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ResumeBody")}},
            },
            "responses": {
                "200": _answer("The rest of the run (JSON), or its event stream", headers),
                **_errors(400, 401, 403, 404, 409, 413, 499, 502, 503, 504),
            },
        }
    }


def _get_request() -> dict[str, Any]:
    return {
        "get": {
            "operationId": "getRequest",
            "summary": "An earlier request's result, or its stream resumed",
            "parameters": [
                {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"},
                },
            ],
            "responses": {
                "200": _answer(
                    "The result, or with Accept: text/event-stream its events",
                    {"X-Request-ID": {"schema": _STR}},
                ),
                "202": _json("Running", "Still running"),
                "204": {
                    "description": "SSE only: Last-Event-ID is at or past the final event; do not reconnect",
                    "headers": {"X-Request-ID": {"schema": _STR}},
                },
                **_errors(400, 401, 403, 404, 409, 499, 502, 503, 504),
            },
        },
        "delete": {
            "operationId": "cancelRequest",
            "summary": "Cancel a running request now (its stream ends with error CANCELLED)",
            "parameters": [
                {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "202": _json("Cancelling", "The run is told to stop"),
                **_errors(401, 403, 404, 409, 503),
            },
        },
    }


def _admin(
    op: str, method: str, name: str, summary: str, *errors: int, params: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        method: {
            "operationId": op,
            "summary": summary,
            "parameters": params or [],
            "responses": {"200": _json(name, summary), **_errors(401, 403, *errors, 503)},
        }
    }


def _public(op: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": op, "summary": summary, "security": [], "responses": responses}}


_HEALTH = {"type": "object", "properties": {"status": _STR}, "required": ["status"]}
_READY = {
    "type": "object",
    "required": ["status", "dependencies"],
    "properties": {
        "status": {"enum": ["ready", "not_ready"]},
        "dependencies": {"type": "object", "additionalProperties": {"type": "boolean"}},
    },
}


# --- the OpenAI- and Anthropic-compatible endpoints: each answers (and errs) in its API's shape

_OA_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": _STR,
                "type": _STR,
                "param": {"type": ["string", "null"]},
                "code": _STR,
            },
        }
    },
}
_AN_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": _STR, "message": _STR, "code": _STR},
        },
    },
}
_USAGE_OA = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: _INT for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "description": "id is the agentpool request id (GET /v1/requests/{id} answers it too)",
    "properties": {
        "id": _STR,
        "object": {"const": "chat.completion"},
        "created": _INT,
        "model": _STR,
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": _INT,
                    "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                    "message": {
                        "type": "object",
                        "required": ["role"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": ["string", "null"]},
                            "tool_calls": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
        "usage": _USAGE_OA,
        "agentpool": {"type": "object", "description": "Only on a run paused for approval"},
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
    "description": "id is the agentpool request id (GET /v1/requests/{id} answers it too)",
    "properties": {
        "id": _STR,
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "model": _STR,
        "content": {"type": "array", "items": {"type": "object", "required": ["type"]}},
        "stop_reason": {"enum": ["end_turn", "max_tokens", "tool_use", "pause_turn"]},
        "usage": {
            "type": "object",
            "required": ["input_tokens", "output_tokens"],
            "properties": {"input_tokens": _INT, "output_tokens": _INT},
        },
    },
}
_OA_MODEL = {
    "type": "object",
    "required": ["id", "object"],
    "properties": {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR},
}
_AN_MODEL = {
    "type": "object",
    "required": ["type", "id"],
    "properties": {"type": {"const": "model"}, "id": _STR, "display_name": _STR, "created_at": _STR},
}
_MODELS = {
    "oneOf": [
        {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _OA_MODEL}},
        },
        {
            "type": "object",
            "required": ["data", "has_more"],
            "properties": {"data": {"type": "array", "items": _AN_MODEL}, "has_more": {"type": "boolean"}},
        },
    ]
}
_THREAD_HEADER = {
    "name": "X-Thread-ID",
    "in": "header",
    "required": False,
    "description": "Use the pool's stored thread (only the new trailing messages are appended); "
    "without it the call is stateless",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
}
_SSE_TEXT = {  # one event of the OpenAI or Anthropic stream, as its SDKs read it
    "type": "object",
    "required": ["data"],
    "description": "The API's own stream events, as its SDKs read them: data is one JSON chunk "
    "(OpenAI: a chat.completion.chunk, and [DONE] at the end; Anthropic: the event named by event)",
    "properties": {"event": _STR, "data": _STR, "id": _STR},
}


def _shaped_errors(schema: dict[str, Any], *statuses: int) -> dict[str, Any]:
    out = {}
    for c in statuses:
        entry: dict[str, Any] = {
            "description": _ERROR_TEXT[c],
            "content": {"application/json": {"schema": schema}},
        }
        headers = {**RATE_HEADERS, **(_RETRY_AFTER if c in (429, 503) else {})}
        if c not in (401, 403):
            entry["headers"] = headers
        out[str(c)] = entry
    return out


def _compat(
    op: str, summary: str, body: str, answer: dict[str, Any], errors: dict[str, Any], example: dict[str, Any]
) -> dict[str, Any]:
    headers = {
        "X-Request-ID": {"schema": _STR},
        "X-Routing-Tier": _REQUEST_HEADERS["X-Routing-Tier"],
        **RATE_HEADERS,
    }
    return {
        "post": {
            "operationId": op,
            "summary": summary,
            "parameters": [_THREAD_HEADER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body), "example": example}},
            },
            "responses": {
                "200": {
                    "description": "The answer, or with stream: true its events (SSE)",
                    "headers": headers,
                    "content": {
                        "application/json": {"schema": answer},
                        "text/event-stream": {"schema": _SSE_TEXT},
                    },
                },
                **errors,
            },
        }
    }


def _models(op: str, summary: str, schema: dict[str, Any], params: list[dict[str, Any]]) -> dict[str, Any]:
    either = {"oneOf": [_OA_ERROR, _AN_ERROR]}
    ok = {"description": summary, "content": {"application/json": {"schema": schema}}}
    return {
        "get": {
            "operationId": op,
            "summary": summary + " (in Anthropic's shape when anthropic-version is sent)",
            "parameters": params,
            "responses": {"200": ok, **_shaped_errors(either, 401, 403, *([404] if params else []), 503)},
        }
    }


def _compat_paths() -> dict[str, Any]:
    model_param = [{"name": "model", "in": "path", "required": True, "schema": _STR}]
    statuses = (400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504)
    return {
        "/v1/chat/completions": _compat(
            "chatCompletions",
            "OpenAI Chat Completions; model is a pool",
            "ChatCompletionBody",
            _COMPLETION,
            _shaped_errors(_OA_ERROR, *statuses),
            {"model": "support", "messages": [{"role": "user", "content": "Hello"}]},
        ),
        "/v1/messages": _compat(
            "messages",
            "Anthropic Messages; model is a pool",
            "MessagesBody",
            _MESSAGE,
            _shaped_errors(_AN_ERROR, *statuses),
            {"model": "support", "max_tokens": 256, "messages": [{"role": "user", "content": "Hello"}]},
        ),
        "/v1/models": _models("listModels", "The pools this key may use, as models", _MODELS, []),
        "/v1/models/{model}": _models(
            "getModel", "One pool, as a model", {"oneOf": [_OA_MODEL, _AN_MODEL]}, model_param
        ),
    }


def _fleet_paths() -> dict[str, Any]:
    pool = {"name": "pool", "in": "path", "required": True, "schema": _STR}
    deployment = {"name": "deployment", "in": "path", "required": True, "schema": _STR}
    pools_list = {
        "type": "object",
        "required": ["pools"],
        "properties": {"pools": {"type": "array", "items": _ref("PoolSummary")}},
    }
    scaled = {
        "type": "object",
        "required": ["pool", "deployment", "replicas"],
        "properties": {"pool": _STR, "deployment": _STR, "replicas": _INT},
    }
    restarted = {
        "type": "object",
        "required": ["pool", "restart_generation"],
        "properties": {"pool": _STR, "restart_generation": _INT},
    }

    def op(op_id: str, summary: str, status: str, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
        return {
            "operationId": op_id,
            "summary": summary,
            "responses": {
                status: {"description": summary, "content": {"application/json": {"schema": schema}}},
                **_errors(401, 403, *errors, 503),
            },
        }

    scale = op("scaleDeployment", "Set a deployment's desired replicas", "200", scaled, 400, 404, 413)
    scale["parameters"] = [pool, deployment]
    scale["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref("ScaleBody")}}}
    restart = op("restartPool", "Rolling restart, one replica at a time", "202", restarted, 404)
    restart["parameters"] = [pool]
    one = op("getPool", "The pool and each of its replicas", "200", _ref("PoolStatus"), 404)
    one["parameters"] = [pool]
    drained = {
        "type": "object",
        "required": ["pool", "agent_id", "pid", "draining"],
        "properties": {"pool": _STR, "agent_id": _STR, "pid": _INT, "draining": {"type": "boolean"}},
    }
    drain = op(
        "drainAgent", "Replace one agent: a new one starts, then this one drains", "202", drained, 404, 409
    )
    drain["parameters"] = [pool, {"name": "agent_id", "in": "path", "required": True, "schema": _STR}]
    fleet = op(
        "fleet", "The dashboard's view: pools, agents, totals, 15 min of history", "200", _ref("FleetView")
    )
    fleet["description"] = (
        "Any valid key: ask-only keys read their tenant's pools; `fleet` keys every tenant's."
    )
    events = {
        "operationId": "fleetEvents",
        "summary": "The dashboard's view as SSE: a `fleet` event each second (history: newest buckets only)",
        "responses": {
            "200": {
                "description": "An endless stream of `fleet` events (data: FleetView), and `unavailable` "
                "events while Redis is away",
                "content": {"text/event-stream": {"schema": _STR}},
            },
            **_errors(401, 403, 503),
        },
    }
    return {
        "/v1/pools": {
            "get": op("listPools", "The tenant's pools: status, desired vs actual", "200", pools_list)
        },
        "/v1/pools/{pool}": {"get": one},
        "/v1/pools/{pool}/deployments/{deployment}": {"put": scale},
        "/v1/pools/{pool}/restart": {"post": restart},
        "/v1/pools/{pool}/agents/{agent_id}/drain": {"post": drain},
        "/v1/fleet": {"get": fleet},
        "/v1/fleet/events": {"get": events},
        "/v1/health": {"get": op("health", "Fleet health of the tenant's pools", "200", _ref("Health"))},
        "/v1/config": {
            "get": op(
                "configStatus",
                "The pools config this gateway runs: source, version, last refusal",
                "200",
                _ref("ConfigStatus"),
            )
        },
    }


def _paths() -> dict[str, Any]:
    key_param = [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        **_compat_paths(),
        **_fleet_paths(),
        "/v1/ask/{pool}": _ask(),
        "/v1/groups/{group}/ask": _ask(
            "askGroup",
            "Ask a group's level (escalate: one level up when a run fails or its answer is rejected)",
            "group",
            "GroupAskBody",
            ("AskResponse", "GroupAnswer", "FanOutResponse"),
        ),
        "/v1/groups/{group}": {
            "get": {
                "operationId": "getGroup",
                "summary": "Per level: agents ready/desired, depth, processed, error rate, p50 latency",
                "parameters": [{"name": "group", "in": "path", "required": True, "schema": _STR}],
                "responses": {
                    "200": _json("GroupStatus", "The group's levels"),
                    **_errors(401, 403, 404, 503),
                },
            }
        },
        "/v1/agents/{agent_id}/ask": _ask(
            "askAgent",
            "Ask one agent directly (its depth bound holds: 503 AGENT_SATURATED when it is full)",
            "agent_id",
            answers=(),
        ),
        "/v1/requests/{request_id}": _get_request(),
        "/v1/requests/{request_id}/resume": _resume(),
        "/v1/keys": _admin("listKeys", "get", "KeyList", "The tenant's API keys"),
        "/v1/keys/{key_id}": _admin(
            "revokeKey", "delete", "Revoked", "Revoke one of the tenant's keys", 404, params=key_param
        ),
        "/v1/webhooks/secret": _admin(
            "webhookSecret", "get", "WebhookSecret", "The secret that signs the tenant's webhooks"
        ),
        "/healthz": _public(
            "healthz",
            "The process is up",
            {"200": {"description": "Up", "content": {"application/json": {"schema": _HEALTH}}}},
        ),
        "/readyz": _public(
            "readyz",
            "RabbitMQ and Redis are reachable",
            {
                code: {"description": what, "content": {"application/json": {"schema": _READY}}}
                for code, what in (("200", "Ready"), ("503", "Not ready"))
            },
        ),
        "/metrics": _public(
            "metrics",
            "Prometheus metrics of this gateway process",
            {
                "200": {"description": "Exposition format", "content": {"text/plain": {"schema": _STR}}},
                "404": _error(404),
            },
        ),
        "/openapi.json": _public(
            "openapi",
            "This document",
            {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        ),
    }


def _webhooks() -> dict[str, Any]:
    headers = [
        {
            "name": "X-Webhook-Signature",
            "in": "header",
            "required": True,
            "schema": _STR,
            "description": "sha256=<hex HMAC-SHA256, with the tenant's webhook secret, of the "
            "X-Webhook-Timestamp value, a '.', and the raw body>; check it with "
            "agentpool.gateway.webhooks.verify",
        },
        {
            "name": "X-Webhook-Timestamp",
            "in": "header",
            "required": True,
            "schema": _INT,
            "description": "Unix seconds when this attempt was signed: refuse one far from now "
            "(verify allows 5 minutes) so a captured delivery cannot be replayed",
        },
        {
            "name": "X-Request-ID",
            "in": "header",
            "required": True,
            "schema": _STR,
            "description": "The request's id: deliveries are at least once, dedupe by it",
        },
        {"name": "X-Webhook-Attempt", "in": "header", "required": True, "schema": _INT},
    ]
    return {
        "result": {
            "post": {
                "summary": "The result of a request made with webhook_url; retried with backoff until 2xx",
                "parameters": headers,
                "requestBody": {"content": {"application/json": {"schema": _ref("WebhookPayload")}}},
                "responses": {"200": {"description": "Any 2xx acknowledges the delivery"}},
            }
        }
    }


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agentpool gateway",
            "version": VERSION,
            "description": "Pools of warm LLM agents. Errors are always {error, error_code, details}.",
        },
        "paths": _paths(),
        "webhooks": _webhooks(),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"ApiKey": []}, {"Bearer": []}],
    }


@functools.cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


async def openapi_json(request: Request) -> Response:
    return Response(_encoded(), media_type="application/json")
