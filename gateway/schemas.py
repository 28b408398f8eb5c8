"""Request and response bodies of the HTTP API (msgspec; also the source of the OpenAPI doc)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from agentpool.broker.shapes import LevelRun, RunFailure
from agentpool.gateway.keys import KeyInfo
from agentpool.shared.messages import StepEvent, Timings, ToolCall, Usage

MAX_BODY_BYTES = 256 * 1024
MAX_CONTENT_CHARS = 10_000
MAX_CONTEXT_CHARS = 16_000  # all context variable names + values together

ThreadId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
VarName = Annotated[str, msgspec.Meta(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")]
VarValue = Annotated[str, msgspec.Meta(max_length=4000)]
WebhookUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+$", max_length=2048)]


WaitSeconds = Annotated[float, msgspec.Meta(ge=0.1, le=3600)]  # below 0.1 s nothing starts


class PoolOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The request shape of the systems agentpool replaces: ``max_wait_time`` is ``max_wait_s``;
    ``prefer_warm`` answers 503 POOL_COLD instead of waking a pool that has no live agent."""

    max_wait_time: WaitSeconds | None = None
    prefer_warm: bool = False


class AskBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CONTENT_CHARS)]
    thread_id: ThreadId | None = None
    stream: bool = False
    max_wait_s: WaitSeconds | None = None
    context_variables: Annotated[dict[VarName, VarValue], msgspec.Meta(max_length=32)] = {}
    webhook_url: WebhookUrl | None = None  # answer 202 now, POST the result there when done
    # best-of-N: run the question n times in parallel (results + failed); select "first" stops the
    # others once one answers; timeout_s ends the fan-out with the results it has; seed varies prompts
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    select: Literal["all", "first"] = "all"
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    pool_options: PoolOptions | None = None

    def wait_s(self) -> float | None:
        return (
            self.max_wait_s
            if self.max_wait_s is not None
            else (self.pool_options or PoolOptions()).max_wait_time
        )

    @property
    def warm_only(self) -> bool:
        return self.pool_options is not None and self.pool_options.prefer_warm


class GroupAskBody(AskBody, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/groups/{group}/ask``: ``level`` picks the group's pool; ``escalate`` asks the next
    level up when a run fails or the level's validator rejects its answer."""

    level: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    escalate: bool = False


class PendingApproval(msgspec.Struct, kw_only=True):
    """The tool call a paused run waits on: resume with POST /v1/requests/{request_id}/resume."""

    tool_call: ToolCall


class AskResponse(msgspec.Struct, kw_only=True):
    """The answer; ``status: interrupted`` when the run paused for a human's approval (``interrupt``
    names the tool call; ``content`` and ``steps`` are what ran before the pause)."""

    request_id: str
    thread_id: str
    agent_id: str
    content: str
    usage: Usage
    timings: Timings
    created_at: float
    deployment: str = ""  # the agent's deployment (which arm of an A/B answered)
    attempt: int = 1
    status: Literal["completed", "interrupted"] = "completed"
    steps: list[StepEvent] = []  # tool calls, tool results and custom steps, in order
    interrupt: PendingApproval | None = None
    resumed_from: str | None = None  # the paused request this run continued


class RunAnswer(AskResponse, kw_only=True):
    """One run's answer in a fan-out."""

    run: int = 0


class RunCancelled(msgspec.Struct, kw_only=True):
    run: int
    request_id: str


class FanOutResponse(msgspec.Struct, kw_only=True):
    """``n > 1``: every run's answer (in the order they ended), the runs that failed (or were still
    running at ``timeout_s``: DEADLINE_EXCEEDED), and those ``select: first`` stopped."""

    thread_id: str
    results: list[RunAnswer]
    failed: list[RunFailure]
    cancelled: list[RunCancelled] = []


class GroupAnswer(AskResponse, kw_only=True):
    """A group ask's answer: the level that answered and every level that ran (escalation)."""

    group: str = ""
    level: str = ""
    levels: list[LevelRun] = []


class ResumeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A human's decision on the tool call a paused run waits for."""

    approve: bool
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""  # told to the model on a denial
    stream: bool = False


class ErrorBody(msgspec.Struct):
    error: str
    error_code: str
    details: dict[str, Any] = {}


class Accepted(msgspec.Struct, kw_only=True):
    """202 for a webhook request: the result is POSTed to ``webhook_url`` (and readable by id)."""

    request_id: str
    thread_id: str


class Running(msgspec.Struct, kw_only=True):
    request_id: str
    status: Literal["running"] = "running"


class Cancelling(msgspec.Struct, kw_only=True):
    """``DELETE /v1/requests/{id}``: the run is told to stop; its stream ends with ``error CANCELLED``."""

    request_id: str
    status: Literal["cancelling"] = "cancelling"


class WebhookError(msgspec.Struct, kw_only=True):
    error: str
    error_code: str


class WebhookPayload(msgspec.Struct, kw_only=True):
    """The body POSTed to ``webhook_url``; signed in ``X-Webhook-Signature``."""

    request_id: str
    thread_id: str
    pool: str
    status: Literal["completed", "failed", "interrupted"]
    agent_id: str | None = None
    deployment: str | None = None
    content: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    created_at: float | None = None
    error: WebhookError | None = None
    steps: list[StepEvent] | None = None
    interrupt: PendingApproval | None = None  # status interrupted: resume the request to go on


class KeyList(msgspec.Struct, kw_only=True):
    keys: list[KeyInfo]


class Revoked(msgspec.Struct, kw_only=True):
    id: str
    revoked: bool = True


class WebhookSecret(msgspec.Struct, kw_only=True):
    """The secret that signs this tenant's webhooks: HMAC-SHA256 of ``f"{X-Webhook-Timestamp}."`` + body."""

    tenant: str
    secret: str
