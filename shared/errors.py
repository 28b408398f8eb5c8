"""One exception tree for agentpool; every error knows its HTTP status and ``error_code``.

    AgentPoolError                      500 INTERNAL
    ├── ConfigError                     (start-up only: bad pools file or settings)
    ├── BadRequest                      400 BAD_REQUEST / INVALID_JSON / VALIDATION_ERROR / CONTEXT_VARIABLE_*
    │   ├── PayloadTooLarge             413 PAYLOAD_TOO_LARGE
    │   └── WebhookRefused              400 WEBHOOK_URL_REFUSED
    ├── Unauthorized                    401 INVALID_API_KEY
    ├── Forbidden                       403 FORBIDDEN
    ├── NotFound                        404 POOL_NOT_FOUND / REQUEST_NOT_FOUND / NOT_FOUND
    ├── Conflict                        422 IDEMPOTENCY_CONFLICT
    ├── StateConflict                   409 NOT_WAITING / ALREADY_RESUMED / THREAD_WAITING / REQUEST_ENDED
    ├── RateLimited                     429 RATE_LIMIT_EXCEEDED       (retry_after_s)
    ├── Unavailable                     503 POOL_SATURATED / POOL_LIMIT / BROKER_UNAVAILABLE
    │                                       / REDIS_UNAVAILABLE       (retry_after_s)
    ├── QueueTimeout                    504 QUEUE_TIMEOUT
    ├── RequestFailed                   502 (an ``error`` event ended the reply; code from it)
    ├── Interrupted                     200 INTERRUPTED (not a failure: the run waits for approval)
    └── ProviderError                   502 PROVIDER_*  (raised inside workers, sent as events)

Errors from aio-pika, redis and the SDKs are translated where they are caught (broker/amqp.py,
broker/streams.py, workers/providers/*) so callers only ever see this tree. The answers the HTTP
guard writes before a request reaches the app (431 HEADERS_TOO_LARGE, 414 URI_TOO_LONG, 408
REQUEST_TIMEOUT, 503 TOO_MANY_CONNECTIONS) have the same body shape: see gateway/guard.py.
"""

from __future__ import annotations

from typing import Any


class AgentPoolError(Exception):
    """Base of every error agentpool raises on purpose."""

    status: int = 500
    error_code: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        error_code: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code
        self.details = details or {}
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The one error shape every HTTP answer uses: ``{error, error_code, details}``."""
        return {"error": self.message, "error_code": self.error_code, "details": self.details}


class ConfigError(AgentPoolError):
    error_code = "CONFIG_ERROR"


class BadRequest(AgentPoolError):
    status = 400
    error_code = "BAD_REQUEST"


class PayloadTooLarge(BadRequest):
    status = 413
    error_code = "PAYLOAD_TOO_LARGE"


class WebhookRefused(BadRequest):
    """A ``webhook_url`` that is malformed or resolves to loopback/private/link-local addresses."""

    error_code = "WEBHOOK_URL_REFUSED"


class Unauthorized(AgentPoolError):
    status = 401
    error_code = "INVALID_API_KEY"


class Forbidden(AgentPoolError):
    status = 403
    error_code = "FORBIDDEN"


class NotFound(AgentPoolError):
    status = 404
    error_code = "NOT_FOUND"


class Conflict(AgentPoolError):
    status = 422
    error_code = "IDEMPOTENCY_CONFLICT"


class StateConflict(AgentPoolError):
    """The request is not in a state that allows this (resume a run that is not paused, ...)."""

    status = 409
    error_code = "CONFLICT"


class RateLimited(AgentPoolError):
    status = 429
    error_code = "RATE_LIMIT_EXCEEDED"


class Unavailable(AgentPoolError):
    status = 503
    error_code = "UNAVAILABLE"

    def __init__(self, message: str, *, internal: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        # Where and why (a URL, a socket error): for logs and the CLI, never for an HTTP body,
        # which any caller (authenticated or not) may see.
        self.internal = internal


class QueueTimeout(AgentPoolError):
    status = 504
    error_code = "QUEUE_TIMEOUT"


class RequestFailed(AgentPoolError):
    """A reply stream ended with an ``error`` event; ``error_code`` is the event's."""

    status = 502
    error_code = "REQUEST_FAILED"


class Interrupted(AgentPoolError):
    """Not a failure: the run paused before a tool call that needs a human's approval.

    ``interrupt`` is the final event (``agentpool.shared.messages.Interrupt``); continue the run with
    ``AgentPoolClient.resume(interrupt.request_id, approve=...)``."""

    status = 200
    error_code = "INTERRUPTED"

    def __init__(self, interrupt: Any) -> None:
        call = interrupt.tool_call
        super().__init__(
            f"request {interrupt.request_id} waits for approval of tool call {call.name!r}",
            details={"request_id": interrupt.request_id, "tool_call": call.name},
        )
        self.interrupt = interrupt


class ProviderError(AgentPoolError):
    """A model provider call failed; ``retryable`` says whether another attempt may help."""

    status = 502
    error_code = "PROVIDER_ERROR"

    def __init__(
        self,
        message: str,
        *,
        error_code: str = "PROVIDER_ERROR",
        retryable: bool = False,
        retry_after_s: float | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message, error_code=error_code, retry_after_s=retry_after_s)
        self.retryable = retryable
        self.fatal = fatal  # e.g. bad credentials: the replica itself is unhealthy


STATUS_BY_CODE = {
    "QUEUE_TIMEOUT": 504,
    "RUN_TIMEOUT": 504,
    "CANCELLED": 499,
    "ANSWER_REJECTED": 422,  # the level's validator refused the answer
    "THREAD_WAITING": 409,
    "NOT_WAITING": 409,
    "TOOL_NAME_CONFLICT": 400,  # a request's own tool named like one of the agent type's
}


def status_for_code(error_code: str) -> int:
    """HTTP status for an ``error`` event's code when the gateway answers in JSON mode."""
    return STATUS_BY_CODE.get(error_code, 502)
