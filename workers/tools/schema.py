"""A function's tool schema from its signature, type hints and docstring, in one place.

The parameters become a msgspec Struct made at load time: ``msgspec.json.schema`` gives the JSON
Schema the model is offered, and ``msgspec.convert`` checks the model's arguments against the very
same type before the function runs. The tool loop never inspects functions itself.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from agentpool.shared.errors import ConfigError
from agentpool.workers.providers.base import ToolSpec

_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")  # Google style: "Args:", "Returns:", ...
_ARG_SECTIONS = frozenset({"args", "arguments", "parameters"})
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


@dataclass(frozen=True)
class FunctionSchema:
    spec: ToolSpec
    arguments: type[msgspec.Struct]  # what the model's arguments are converted to
    takes_kwargs: tuple[str, ...]  # parameter names, in order


def function_schema(fn: Callable[..., Any], name: str | None = None, origin: str = "") -> FunctionSchema:
    """The schema of ``fn``; a :class:`ConfigError` naming ``origin`` and the parameter if it has none."""
    where = origin or getattr(fn, "__qualname__", repr(fn))
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
    except (TypeError, ValueError, NameError) as e:
        raise ConfigError(f"tool {where!r}: cannot read its signature: {e}") from None
    summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
    fields = [_field(where, p, hints, arg_docs) for p in sig.parameters.values()]
    struct = msgspec.defstruct(
        f"{getattr(fn, '__name__', 'tool')}_arguments", fields, kw_only=True, forbid_unknown_fields=True
    )
    try:
        parameters = _object_schema(struct)
    except TypeError as e:
        why = str(e).strip().splitlines()[-1]  # msgspec's last line names the type
        raise ConfigError(f"tool {where!r}: a parameter type cannot become a JSON schema: {why}") from None
    tool_name = str(name or getattr(fn, "__name__", ""))
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool_name):
        raise ConfigError(f"tool {where!r}: name {tool_name!r} must be 1-64 of A-Z a-z 0-9 _ -")
    spec = ToolSpec(name=tool_name, description=summary, parameters=parameters)
    return FunctionSchema(spec, struct, tuple(f[0] for f in fields))


def _field(
    where: str, p: inspect.Parameter, hints: dict[str, Any], docs: dict[str, str]
) -> tuple[str, Any, Any] | tuple[str, Any]:
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        raise ConfigError(f"tool {where!r}: parameter {p.name!r}: *args/**kwargs cannot become a schema")
    if p.kind is p.POSITIONAL_ONLY:
        raise ConfigError(
            f"tool {where!r}: parameter {p.name!r} is positional-only; tools are called by name"
        )
    if p.name not in hints:
        raise ConfigError(f"tool {where!r}: parameter {p.name!r} has no type hint")
    type_: Any = hints[p.name]
    if p.name in docs:
        type_ = Annotated[type_, msgspec.Meta(description=docs[p.name])]
    if p.default is inspect.Parameter.empty:
        return (p.name, type_)
    return (p.name, type_, p.default)


def _object_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The arguments object at the top level (msgspec puts it under ``$defs`` and refers to it)."""
    schema = msgspec.json.schema(struct)
    defs: dict[str, Any] = schema.pop("$defs", {})
    ref = schema.get("$ref", "")
    top = dict(defs.pop(ref.rsplit("/", 1)[-1], schema)) if ref else schema
    top.pop("title", None)
    top.setdefault("properties", {})
    if defs:
        top["$defs"] = defs  # nested types keep their "#/$defs/..." references
    return top


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (text before the first section) and the text of each ``Args:`` entry."""
    summary: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    indent = -1
    for line in doc.splitlines():
        if header := _SECTION.match(line):
            section, current, indent = header.group(1).lower(), None, -1
            continue
        if section is None:
            summary.append(line)
        elif section in _ARG_SECTIONS and line.strip():
            depth = len(line) - len(line.lstrip())
            m = _ARG_LINE.match(line)
            if m and (indent < 0 or depth <= indent):
                indent, current = depth, m.group(1).lstrip("*")
                args[current] = m.group(3).strip()
            elif current is not None:
                args[current] = f"{args[current]} {line.strip()}"
    return "\n".join(summary).strip(), args
