"""The SQL agent's prompt: the pools file's system prompt, then the database schema, tables shuffled.

A ``prompt_renderer`` runs for every request. This one lists the tables in an order drawn from the
request id, so agents running in parallel each see the schema in a different order (and do not all
anchor on the first table) while a retried request sees the same prompt again.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from agentpool.shared.config import AgentType
from agentpool.shared.messages import Message, Request
from agentpool.workers.prompting import default_renderer
from agentpool.workers.providers.base import Prompt
from examples.sql_agent import tools

SCHEMA_HEADING = "Tables of the shop database (SQLite, read-only), in no particular order:"


def render(agent_type: AgentType, request: Request, history: list[Message]) -> Prompt:
    """Render like the default (``{VARIABLE}`` substitution, history, the user message), with the
    schema appended to the system prompt in this request's own table order."""
    prompt = default_renderer(agent_type, request, history)
    tables = list(schema())
    random.Random(request.request_id).shuffle(tables)
    system = "\n\n".join(part for part in (prompt.system, SCHEMA_HEADING + "\n" + "\n".join(tables)) if part)
    return Prompt(system=system, messages=prompt.messages)


def table_order(system: str) -> list[str]:
    """The table names in the order a rendered system prompt lists them."""
    _, _, listing = system.partition(SCHEMA_HEADING)
    return [line[2:].split("(", 1)[0] for line in listing.splitlines() if line.startswith("- ")]


@functools.cache
def schema() -> tuple[str, ...]:
    """One line per table: ``- orders(id INTEGER, customer_id INTEGER -> customers.id, ...) key (id)``.

    Read once per process, on first use: the database is read-only."""
    with tools.connect() as conn:
        return tuple(_line(table, tools.columns(conn, table)) for table in tools.table_names(conn))


def _line(table: str, columns: list[dict[str, Any]]) -> str:
    described = ", ".join(
        f"{c['name']} {c['type']}" + (f" -> {c['references']}" if "references" in c else "") for c in columns
    )
    key = ", ".join(c["name"] for c in columns if c.get("primary_key"))
    return f"- {table}({described})" + (f" key ({key})" if key else "")
