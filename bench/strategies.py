"""A trivial custom routing strategy for ``bench/ab.py --strategies`` (``bench.strategies:shallowest``)."""

from __future__ import annotations

from agentpool.broker.router import Candidate
from agentpool.shared.messages import Request


def shallowest(candidates: list[Candidate], request: Request | None) -> list[Candidate]:
    """The replicas by the router's depth estimate, shallowest first (ties: the order given)."""
    return sorted(candidates, key=lambda c: c.depth)
