"""Function tools: a Python function named ``package.module:function`` in the pools file.

Sync functions run in a worker thread so a slow one never stalls the replica's event loop (a
cancelled call stops waiting for it; the thread itself finishes in the background). A function
marked with :func:`agentpool.agent.tool` may set its own name and timeout.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any

import msgspec

from agentpool.shared.errors import ConfigError
from agentpool.workers.imports import import_object
from agentpool.workers.tools.base import Tool, ToolFailure
from agentpool.workers.tools.schema import function_schema

TOOL_ATTR = "__agentpool_tool__"  # set by agentpool.agent.tool: {"name": ..., "timeout_s": ...}
_JSON = msgspec.json.Encoder()


class FunctionTool(Tool):
    def __init__(self, fn: Callable[..., Any], origin: str = "") -> None:
        marks: dict[str, Any] = getattr(fn, TOOL_ATTR, {})
        self.origin = origin or f"{fn.__module__}:{fn.__qualname__}"
        schema = function_schema(fn, name=marks.get("name"), origin=self.origin)
        self.spec = schema.spec
        self.timeout_s = marks.get("timeout_s")
        self._arguments = schema.arguments
        self._names = schema.takes_kwargs
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn)

    async def call(self, arguments: dict[str, Any]) -> str:
        try:
            parsed = msgspec.convert(arguments, self._arguments)
        except msgspec.ValidationError as e:
            raise ToolFailure(f"invalid arguments for {self.name}: {e}", "TOOL_ARGUMENTS_INVALID") from None
        kwargs = {n: getattr(parsed, n) for n in self._names}
        try:
            if self._is_async:
                result = await self._fn(**kwargs)
            else:
                result = await asyncio.to_thread(functools.partial(self._fn, **kwargs))
        except ToolFailure:
            raise
        except Exception as e:  # the model hears what went wrong; the request goes on
            raise ToolFailure(f"{type(e).__name__}: {e}", "TOOL_ERROR") from e
        return render_result(result)


def render_result(result: object) -> str:
    """Text as is; anything else as JSON (msgspec encodes dicts, lists, structs, dataclasses)."""
    if isinstance(result, str):
        return result
    try:
        return _JSON.encode(result).decode()
    except TypeError:
        return str(result)


def load_function_tool(path: str) -> FunctionTool:
    """The tool at ``package.module:function``; :class:`ConfigError` naming the path if it is bad."""
    fn = import_object(path, "tool")
    if not callable(fn):
        raise ConfigError(f"tool {path!r} is not callable")
    return FunctionTool(fn, origin=path)
