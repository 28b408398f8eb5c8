"""The pools file (TOML): providers, agent types and pools, validated at start.

A bad file fails loudly with one message naming the file, the field and the problem, e.g.
``pools.toml: Expected `int`, got `str` - at `$.pools.support.limits.concurrency```.
"""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agentpool.shared.api_config import ApiKeyEntry, RateLimit, Tenant, Webhooks, check_api, key_rate_limit
from agentpool.shared.errors import ConfigError

Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

EXAMPLE_CONFIG = Path(__file__).with_name("pools.example.toml")
PROMPT_VARIABLE = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")  # ``{PRODUCT}`` in a system prompt
# Sampling parameters each provider kind can send; the Anthropic API version the SDK speaks
# (2026-10-21) refuses temperature and top_p, so an agent type on it may not set them.
SAMPLING = {"fake": ("temperature", "top_p"), "openai": ("temperature", "top_p"), "anthropic": ()}


class Provider(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An LLM API account. ``fake`` needs no key; its knobs shape the built-in fake model."""

    kind: Literal["fake", "anthropic", "openai"]
    base_url: str | None = None
    api_key_env: str | None = None
    # fake provider knobs (in-process, deterministic)
    ttft_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    tokens_per_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # 0 = as fast as possible
    reply_tokens: PositiveInt = 24
    crash_marker: str | None = None  # chaos testing: a prompt containing this kills the worker process


IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
ImportPath = Annotated[str, msgspec.Meta(pattern=IMPORT_PATH.pattern)]
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class McpServer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An MCP server an agent type's replicas connect to at warm-up: ``command`` (stdio, a process
    the replica starts; a first word ``python`` is the worker's own interpreter) or ``url``
    (streamable HTTP)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    command: list[str] | None = None
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://\S+$")] | None = None
    env: dict[str, str] = {}  # extra environment for a stdio server
    prefix: str | None = None  # tools are offered as ``{prefix}_{name}``
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # per tool call
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class AgentType(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["chat", "python"] = "chat"  # chat: the built-in model loop; python: `factory`'s agent
    factory: ImportPath | None = None  # kind = "python": "package.module:callable", called once per replica
    options: dict[str, Any] = {}  # free-form settings handed to the factory (Setup.options)
    tools: list[ImportPath] = []  # function tools, "package.module:function"
    mcp_servers: list[McpServer] = []
    approval_required: list[ToolName] = []  # tools that pause the run for a human's approval
    max_tool_rounds: Annotated[int, msgspec.Meta(ge=0, le=100)] = 8
    tool_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # per tool call, unless the tool says
    run_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0  # one request's whole run (its deadline)
    system_prompt: str = "You are a helpful assistant."
    # defaults of the system prompt's {VARS}; a request's context_variables override them, and a
    # variable with neither is refused (400 CONTEXT_VARIABLE_MISSING) before the request is queued
    variables: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Z][A-Z0-9_]*$")], str] = {}
    provider: str
    model: str = "fake-1"
    # None: not sent (the model's default); refused at load for a provider that cannot take it
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    max_tokens: PositiveInt = 1024
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    prompt_renderer: str | None = None  # "package.module:function"
    history_turns: Annotated[int, msgspec.Meta(ge=0)] = 50

    def missing_variables(self, given: dict[str, str]) -> list[str]:
        """The system prompt's ``{VARS}`` that neither ``given`` nor ``variables`` fills (the
        built-in renderer's; a ``prompt_renderer`` of your own takes care of its own)."""
        if self.prompt_renderer is not None:
            return []
        return [n for n in prompt_variables(self.system_prompt) if n not in given and n not in self.variables]


@functools.cache
def prompt_variables(template: str) -> tuple[str, ...]:
    """The ``{VARS}`` of a system prompt, in order, once each (parsed once per prompt, not per request)."""
    return tuple(dict.fromkeys(PROMPT_VARIABLE.findall(template)))


MAX_REPLICAS_CAP = 512  # the most a deployment's max_replicas may be (each has 2x that many slots)
STRATEGIES = ("sticky", "round_robin", "random", "least_loaded")


class Deployment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Slug
    agent_type: str
    replicas: Annotated[int, msgspec.Meta(ge=0)] = 1
    weight: Annotated[int, msgspec.Meta(ge=0)] = 100  # share of new threads: weight / the pool's total
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS_CAP)] = 64  # what scale may ask for


class Limits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    concurrency: PositiveInt = 1  # requests a replica runs at once (its prefetch)
    sticky_depth: PositiveInt = 3  # the sticky replica is used while its depth is below this
    max_depth: PositiveInt = 10  # no replica is sent more than this (ready + in flight)
    rescue_after_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0  # queued this long -> any replica
    max_attempts: PositiveInt = 3  # deliveries before a request is parked as poison
    max_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # default wait for an agent to start


class Group(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Pools that answer the same kind of question at increasing levels (``POST /v1/groups/{g}/ask``
    names a level; ``escalate`` goes one level up when a level fails)."""

    levels: Annotated[list[Slug], msgspec.Meta(min_length=1, max_length=16)]


class Pool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: str = "default"
    group: str | None = None  # the group this pool is a level of, with ``level``
    level: Slug | None = None
    # How a request picks its replica: sticky (the thread's replica, rendezvous + tiers), round_robin,
    # random, least_loaded, or "package.module:callable" (see broker/router.py, Candidate)
    strategy: str = "sticky"
    validator: ImportPath | None = None  # "module:callable" judging this level's answers (escalation)
    prewarm: bool = True
    min_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    limits: Limits = msgspec.field(default_factory=Limits)
    deployments: list[Deployment]
    # A template: each tenant gets its own pool `{name}--{tenant}`, made on its first request.
    per_tenant: bool = False
    tenants: list[Tenant] = []  # per-tenant pools made (and pre-warmed) at start for these tenants
    rate_limit: RateLimit | None = None  # requests per minute to this pool, across keys and gateways


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    providers: dict[str, Provider]
    agent_types: dict[str, AgentType]
    pools: dict[Slug, Pool]
    groups: dict[Slug, Group] = {}
    max_total_pools: PositiveInt | None = None  # static + per-tenant pools; None = no cap
    api_keys: list[ApiKeyEntry] = []  # bootstrap keys (hashed or from env); any one makes auth required
    rate_limit: RateLimit = msgspec.field(default_factory=key_rate_limit)  # default per API key
    webhooks: Webhooks = msgspec.field(default_factory=Webhooks)

    def pool(self, name: str) -> Pool | None:
        return self.pools.get(name)

    def level_pool(self, group: str, level: str) -> str | None:
        """The pool that is ``level`` of ``group``."""
        for name, p in self.pools.items():
            if p.group == group and p.level == level:
                return name
        return None

    def deployment(self, pool: str, name: str) -> Deployment:
        for d in self.pools[pool].deployments:
            if d.name == name:
                return d
        raise KeyError(f"pool {pool!r} has no deployment {name!r}")


def _check(config: Config) -> list[str]:
    """Cross-references msgspec cannot express; each problem names its field."""
    problems = []
    for name, at in config.agent_types.items():
        if at.provider not in config.providers:
            problems.append(f"agent_types.{name}.provider: unknown provider {at.provider!r}")
        else:
            kind = config.providers[at.provider].kind
            for param in ("temperature", "top_p"):
                if getattr(at, param) is not None and param not in SAMPLING[kind]:
                    problems.append(
                        f"agent_types.{name}.{param}: the {kind} provider cannot take it (its API "
                        "refuses sampling parameters); remove it to use the model's default"
                    )
        if at.prompt_renderer is not None and ":" not in at.prompt_renderer:
            problems.append(f"agent_types.{name}.prompt_renderer: expected 'module:function'")
        problems += _check_agent(f"agent_types.{name}", at)
    for name, pool in config.pools.items():
        where = f"pools.{name}"
        lim = pool.limits
        if lim.sticky_depth > lim.max_depth:
            problems.append(f"{where}.limits.sticky_depth: must be <= max_depth ({lim.max_depth})")
        if lim.concurrency >= lim.max_depth:
            problems.append(f"{where}.limits.concurrency: must be < max_depth ({lim.max_depth})")
        if not pool.deployments:
            problems.append(f"{where}.deployments: a pool needs at least one deployment")
        seen: set[str] = set()
        for i, dep in enumerate(pool.deployments):
            if dep.name in seen:
                problems.append(f"{where}.deployments[{i}].name: duplicate {dep.name!r}")
            seen.add(dep.name)
            if dep.agent_type not in config.agent_types:
                problems.append(f"{where}.deployments[{i}].agent_type: unknown agent type {dep.agent_type!r}")
            if dep.replicas > dep.max_replicas:
                problems.append(
                    f"{where}.deployments[{i}].replicas: more than its max_replicas ({dep.max_replicas})"
                )
        if pool.deployments and not any(d.weight for d in pool.deployments):
            problems.append(f"{where}.deployments: at least one weight must be > 0")
        if pool.tenants and not pool.per_tenant:
            problems.append(f"{where}.tenants: only a per_tenant pool has tenants")
        if "--" in name:
            problems.append(f"{where}: '--' is reserved for per-tenant pools ({{pool}}--{{tenant}})")
        if pool.strategy not in STRATEGIES and not IMPORT_PATH.match(pool.strategy):
            problems.append(
                f"{where}.strategy: {pool.strategy!r} is none of {', '.join(STRATEGIES)} "
                "nor 'package.module:callable'"
            )
        problems += _check_level(config, name, pool)
    seen_levels: dict[tuple[str, str], str] = {}
    for name, pool in config.pools.items():
        if pool.group is not None and pool.level is not None:
            other = seen_levels.setdefault((pool.group, pool.level), name)
            if other != name:
                problems.append(
                    f"pools.{name}.level: {other!r} is level {pool.level!r} of {pool.group!r} already"
                )
    problems += check_api(config.api_keys, {name: p.tenant for name, p in config.pools.items()})
    return problems


def _check_level(config: Config, name: str, pool: Pool) -> list[str]:
    where = f"pools.{name}"
    if (pool.group is None) != (pool.level is None):
        return [f"{where}: a pool of a group names both group and level"]
    if pool.group is None:
        return [f"{where}.validator: only a level of a group has a validator"] if pool.validator else []
    group = config.groups.get(pool.group)
    if group is None:
        return [f"{where}.group: unknown group {pool.group!r} (declare it as [groups.{pool.group}])"]
    if pool.level not in group.levels:
        return [f"{where}.level: {pool.level!r} is not a level of {pool.group!r} ({', '.join(group.levels)})"]
    if pool.per_tenant:
        return [f"{where}.group: a per_tenant template cannot be a level"]
    return []


def _check_agent(where: str, at: AgentType) -> list[str]:
    problems = []
    if at.kind == "python" and at.factory is None:
        problems.append(f"{where}.factory: kind = 'python' needs factory = 'package.module:callable'")
    if at.kind == "chat" and at.factory is not None:
        problems.append(f"{where}.factory: only kind = 'python' has a factory")
    if at.approval_required and at.kind != "chat":
        problems.append(f"{where}.approval_required: human approval pauses the built-in loop (kind = 'chat')")
    seen: set[str] = set()
    for i, server in enumerate(at.mcp_servers):
        if (server.command is None) == (server.url is None):
            problems.append(f"{where}.mcp_servers[{i}]: give exactly one of command (stdio) or url (HTTP)")
        if server.command is not None and not server.command:
            problems.append(f"{where}.mcp_servers[{i}].command: empty")
        if server.name in seen:
            problems.append(f"{where}.mcp_servers[{i}].name: duplicate {server.name!r}")
        seen.add(server.name)
    if len(set(at.tools)) != len(at.tools):
        problems.append(f"{where}.tools: a tool is listed twice")
    return problems


def _convert(raw: object, type_: type, where: str) -> object:
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        # msgspec says `$.x.y`; name the table the user wrote instead of `$`.
        msg = str(e).replace("`$", f"`{where}")
        raise ConfigError(msg if " - at `" in msg else f"{msg} - at `{where}`") from None


def parse_config(text: str, source: str = "<config>") -> Config:
    """The pools config from TOML text (the pools file)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return config_from_data(raw, source)


def parse_config_json(data: bytes | str, source: str = "<config>") -> Config:
    """The pools config from a JSON document in the TOML file's schema (a config API's answer)."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object with providers, agent_types and pools")
    return config_from_data(raw, source)


def config_from_data(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate decoded TOML or JSON: types field by field, then the cross-references."""
    try:
        # Convert table by table so a message names the pool/agent type, not `$.pools[...]`.
        sections = (("providers", Provider), ("agent_types", AgentType), ("pools", Pool), ("groups", Group))
        for section, type_ in sections:
            table = raw.get(section)
            if isinstance(table, dict):
                raw[section] = {k: _convert(v, type_, f"{section}.{k}") for k, v in table.items()}
        config = msgspec.convert(raw, Config, from_attributes=True)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {e}") from None
    problems = _check(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate the pools file at ``path`` (TOML; JSON when it ends in ``.json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pools file: {e.strerror}") from None
    if path.suffix == ".json":
        return parse_config_json(text, str(path))
    return parse_config(text, str(path))
