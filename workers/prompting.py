"""Per-run prompt rendering: the default ``{VARIABLE}`` substitution, or a hook by import path.

A hook is ``package.module:function(agent_type, request, history) -> Prompt``; it runs for every
request, so it can vary the prompt per run (e.g. shuffle a schema's tables so parallel agents
see different orders).
"""

from __future__ import annotations

from collections.abc import Callable

from agentpool.shared.config import PROMPT_VARIABLE, AgentType
from agentpool.shared.errors import ConfigError
from agentpool.shared.messages import Message, Request
from agentpool.workers.imports import import_object
from agentpool.workers.providers.base import Prompt

Renderer = Callable[[AgentType, Request, list[Message]], Prompt]


def substitute(template: str, variables: dict[str, str]) -> str:
    """Replace ``{NAME}`` with ``variables[NAME]``; unknown names stay as written (the client
    refuses a request that leaves one unfilled, see ``AgentType.missing_variables``)."""
    return PROMPT_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), template)


def default_renderer(agent_type: AgentType, request: Request, history: list[Message]) -> Prompt:
    return Prompt(
        system=substitute(agent_type.system_prompt, {**agent_type.variables, **request.context_variables}),
        messages=[*history, Message("user", request.content)],
    )


def load_renderer(path: str | None) -> Renderer:
    """Resolve ``module:function`` once at start; a bad path fails the replica loudly."""
    if not path:
        return default_renderer
    fn = import_object(path, "prompt_renderer")
    if not callable(fn):
        raise ConfigError(f"prompt_renderer {path!r} is not callable")
    return fn
