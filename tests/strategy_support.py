"""Custom routing strategies the strategy tests name in their pools files (``tests.strategy_support:...``).

Module state records every call, so a test can tell that the router used the strategy and what
it was offered; the routers of these tests run in the test's own process.
"""

from __future__ import annotations

from agentpool.broker.router import Candidate
from agentpool.shared.messages import Request

CALLS: list[tuple[list[Candidate], Request | None]] = []  # (candidates, request) per call


def highest_id(candidates: list[Candidate], request: Request | None) -> list[str]:
    """Replica ids, the highest first (an order of ids)."""
    CALLS.append((candidates, request))
    return sorted((c.id for c in candidates), reverse=True)


def highest_candidate(candidates: list[Candidate], request: Request | None) -> list[Candidate]:
    """The same order as :func:`highest_id`, as Candidates."""
    CALLS.append((candidates, request))
    return sorted(candidates, key=lambda c: c.id, reverse=True)


def broken(candidates: list[Candidate], request: Request | None) -> list[str]:
    """A strategy with a bug: every request it sees goes by the thread's hash instead."""
    raise RuntimeError("the strategy broke")
