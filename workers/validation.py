"""A level's answer validator (``validator = "module:callable"`` on a pool of a group).

``validate(content, request) -> bool | str`` runs on the replica before the answer is written:
``True`` accepts it; ``False`` or a non-empty string (the reason) rejects it, and the run ends
with ``error ANSWER_REJECTED`` instead, storing no turn, so an escalating group ask re-runs the
question one level up on a thread that does not hold the rejected answer. A coroutine function is
awaited; a validator that raises rejects, with the exception as the reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from agentpool.shared.errors import ConfigError
from agentpool.shared.messages import Request
from agentpool.workers.imports import import_object

Validator = Callable[[str, Request], "bool | str | Awaitable[bool | str]"]


def load_validator(path: str | None) -> Validator | None:
    if not path:
        return None
    fn = import_object(path, "validator")
    if not callable(fn):
        raise ConfigError(f"validator {path!r} is not callable")
    return fn


async def rejection(validator: Validator, content: str, request: Request) -> str | None:
    """Why ``validator`` rejects the answer, or None when it accepts it."""
    try:
        verdict = validator(content, request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
    except Exception as e:
        return f"the validator raised {type(e).__name__}: {e}"
    if verdict is True:
        return None
    if isinstance(verdict, str) and verdict:
        return verdict
    return "the level's validator rejected the answer"
