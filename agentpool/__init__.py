"""agentpool: pools of warm LLM agents behind RabbitMQ and Redis.

The public Python API is this package's top level::

    from agentpool import AgentPoolClient, Chunk, End, Interrupted

    async with AgentPoolClient.from_env() as client:
        end = await client.ask("support", "Hi", thread_id="t-1")

Agent code imports :mod:`agentpool.agent`. Everything else (``agentpool.broker``,
``agentpool.workers``, ``agentpool.gateway``, ``agentpool.shared``, linked from the repository's
top-level folders of those names) is internal and may change between minor versions. The names
below load on first use, so ``agentpool`` commands that need none of them (``fake-llm``,
``--help``) do not import the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from agentpool.broker.client import AgentPoolClient, Ticket
    from agentpool.shared.config import Config, load_config
    from agentpool.shared.errors import (
        AgentPoolError,
        BadRequest,
        Forbidden,
        Interrupted,
        NotFound,
        PayloadTooLarge,
        RateLimited,
        RequestFailed,
        StateConflict,
        Unauthorized,
        Unavailable,
    )
    from agentpool.shared.messages import (
        Chunk,
        End,
        Event,
        Interrupt,
        Restart,
        Start,
        Step,
        Timings,
        ToolCall,
        ToolResult,
        Usage,
    )
    from agentpool.shared.messages import Error as ErrorEvent
    from agentpool.shared.settings import Settings

_WHERE = {
    "AgentPoolClient": "agentpool.broker.client",
    "Ticket": "agentpool.broker.client",
    "Config": "agentpool.shared.config",
    "load_config": "agentpool.shared.config",
    "Settings": "agentpool.shared.settings",
    **dict.fromkeys(
        [
            "AgentPoolError",
            "BadRequest",
            "Forbidden",
            "Interrupted",
            "NotFound",
            "PayloadTooLarge",
            "RateLimited",
            "RequestFailed",
            "StateConflict",
            "Unauthorized",
            "Unavailable",
        ],
        "agentpool.shared.errors",
    ),
    **dict.fromkeys(
        [
            "Chunk",
            "End",
            "Event",
            "Interrupt",
            "Restart",
            "Start",
            "Step",
            "Timings",
            "ToolCall",
            "ToolResult",
            "Usage",
        ],
        "agentpool.shared.messages",
    ),
}
_RENAMED = {"ErrorEvent": ("agentpool.shared.messages", "Error")}

__all__ = [
    "AgentPoolClient",
    "AgentPoolError",
    "BadRequest",
    "Chunk",
    "Config",
    "End",
    "ErrorEvent",
    "Event",
    "Forbidden",
    "Interrupt",
    "Interrupted",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RequestFailed",
    "Restart",
    "Settings",
    "Start",
    "StateConflict",
    "Step",
    "Ticket",
    "Timings",
    "ToolCall",
    "ToolResult",
    "Unauthorized",
    "Unavailable",
    "Usage",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'agentpool' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
