"""A function tool beside the MCP server's: refunds, which the pools file makes wait for a human.

Refunds are recorded in memory per replica process (a real desk would call its payments API).
"""

from __future__ import annotations

REFUNDS: list[tuple[str, int]] = []
MAX_CENTS = 50_000


def refund_order(order_id: str, amount_cents: int) -> str:
    """Refund part or all of an order to the customer's original payment method.

    Args:
        order_id: the order to refund, like A1001
        amount_cents: how much to give back, in cents
    """
    if not 0 < amount_cents <= MAX_CENTS:
        raise ValueError(f"amount_cents must be 1..{MAX_CENTS}, got {amount_cents}")
    REFUNDS.append((order_id, amount_cents))
    return f"refunded {amount_cents / 100:.2f} on order {order_id}"
