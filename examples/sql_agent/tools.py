"""The SQL agent's tools over ``shop.db``: list the tables, describe one, run a read-only query.

Read-only for real, in three layers: the file is opened ``mode=ro``, the connection is
``PRAGMA query_only``, and an authorizer lets a statement only read (so ``WITH x AS (...) DELETE``
fails too, not only statements that start with a write). A refused query raises ``ValueError``,
which the model gets back as an error tool result it can correct itself from.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

DB_PATH = Path(__file__).with_name("shop.db")
MAX_ROWS = 200  # whatever ``limit`` the model asks for
SAMPLE_ROWS = 3
QUERY_TIMEOUT_S = 5.0  # a runaway query (a recursive CTE without end) is interrupted

_READS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)  # whitespace and comments
_FIRST_WORD = re.compile(r"[A-Za-z]+")


@contextmanager
def connect(path: Path = DB_PATH) -> Iterator[sqlite3.Connection]:
    """A read-only connection: ``mode=ro``, ``query_only``, and only reads authorized."""
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_only_reads)
        yield conn


def list_tables() -> list[str]:
    """The names of the tables in the shop database."""
    with connect() as conn:
        return table_names(conn)


def describe_table(table: str) -> dict[str, Any]:
    """A table's columns (name, type, primary key, references) and a few sample rows.

    Args:
        table: the table's name, as list_tables gives it
    """
    with connect() as conn:
        known = table_names(conn)
        if table not in known:
            raise ValueError(f"no table {table!r}; the tables are {', '.join(known)}")
        cursor = conn.execute(f'SELECT * FROM "{table}" LIMIT {SAMPLE_ROWS}')
        return {
            "table": table,
            "columns": columns(conn, table),
            "sample_rows": [list(row) for row in cursor.fetchall()],
        }


def run_query(sql: str, limit: int = 50) -> dict[str, Any]:
    """Run one read-only SQL query (SELECT, or WITH ... SELECT) and return its rows.

    Args:
        sql: a single SQLite SELECT statement
        limit: return at most this many rows (at most 200)
    """
    statement = _read_only_statement(sql)
    limit = max(1, min(limit, MAX_ROWS))
    with connect() as conn:
        deadline = time.monotonic() + QUERY_TIMEOUT_S
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            cursor = conn.execute(statement)
            rows = cursor.fetchmany(limit + 1)
        except sqlite3.DatabaseError as e:
            if "not authorized" in str(e):
                why = "read-only: SQLite refused a step of this query that is not a plain read"
                raise ValueError(f"{why} (a write, a pragma, an attach or an extension)") from None
            if "interrupted" in str(e):
                raise ValueError(f"the query ran longer than {QUERY_TIMEOUT_S:g} s and was stopped") from None
            raise ValueError(f"SQLite: {e}") from None
        names = [d[0] for d in cursor.description or ()]
    return {
        "columns": names,
        "rows": [list(row) for row in rows[:limit]],
        "truncated": len(rows) > limit,
    }


def table_names(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    )
    return [name for (name,) in rows]


def columns(conn: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    """Each column of ``table``: name, type, and where set, ``primary_key`` and ``references``."""
    conn.set_authorizer(None)  # the table_info pragmas are reads, but the authorizer cannot tell
    try:
        refs = {row[3]: f"{row[2]}.{row[4]}" for row in conn.execute(f'PRAGMA foreign_key_list("{table}")')}
        out: list[dict[str, Any]] = []
        for _cid, name, type_, notnull, _default, pk in conn.execute(f'PRAGMA table_info("{table}")'):
            column: dict[str, Any] = {"name": name, "type": type_, "not_null": bool(notnull)}
            if pk:
                column["primary_key"] = True
            if name in refs:
                column["references"] = refs[name]
            out.append(column)
        return out
    finally:
        conn.set_authorizer(_only_reads)


def _read_only_statement(sql: str) -> str:
    """``sql`` as one statement without its final ``;``; ValueError unless it is a single read."""
    text = sql.strip().rstrip(";").rstrip()
    leading = _LEADING.match(text)
    word = _FIRST_WORD.match(text, leading.end() if leading else 0)
    first = word.group(0).upper() if word else ""
    if first not in ("SELECT", "WITH"):
        raise ValueError(f"read-only: only SELECT (or WITH ... SELECT) queries run, not {first or 'this'}")
    for i, char in enumerate(text):
        # complete_statement knows SQL quoting: a ';' inside a string or comment ends nothing
        if char == ";" and sqlite3.complete_statement(text[: i + 1]):
            raise ValueError("one statement per query: remove everything after the first ';'")
    return text


def _only_reads(
    action: int, _arg1: str | None, _arg2: str | None, _db: str | None, _trigger: str | None
) -> int:
    return sqlite3.SQLITE_OK if action in _READS else sqlite3.SQLITE_DENY
