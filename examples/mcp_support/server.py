"""An MCP server for a support desk: ``lookup_order(order_id)`` over a small in-file order book.

Run it over stdio (what a pools file's ``command`` starts) or over streamable HTTP::

    python -m examples.mcp_support.server
    python -m examples.mcp_support.server --http --port 9000   # endpoint http://127.0.0.1:9000/mcp

and point an agent type at it::

    [[agent_types.support.mcp_servers]]
    name = "orders"
    command = ["python", "-m", "examples.mcp_support.server"]   # or: url = "http://127.0.0.1:9000/mcp"
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

MCP_PATH = "/mcp"


class Item(TypedDict):
    sku: str
    name: str
    quantity: int


class Order(TypedDict):
    order_id: str
    status: str  # placed, shipped, delivered, cancelled
    items: list[Item]
    eta: str | None  # ISO date, None once delivered or cancelled


ORDERS: dict[str, Order] = {
    "A1001": {
        "order_id": "A1001",
        "status": "shipped",
        "items": [{"sku": "KB-87", "name": "Mechanical keyboard", "quantity": 1}],
        "eta": "2025-06-12",
    },
    "A1002": {
        "order_id": "A1002",
        "status": "placed",
        "items": [
            {"sku": "MS-02", "name": "Wireless mouse", "quantity": 2},
            {"sku": "PD-XL", "name": "Desk pad", "quantity": 1},
        ],
        "eta": "2025-06-15",
    },
    "A1003": {
        "order_id": "A1003",
        "status": "delivered",
        "items": [{"sku": "MN-27", "name": "27-inch monitor", "quantity": 1}],
        "eta": None,
    },
}


def build_server() -> MCPServer:
    """The support desk's MCP server (built on demand: constructing one configures logging)."""
    server: MCPServer = MCPServer("support-desk", log_level="WARNING")

    @server.tool()
    def lookup_order(order_id: str) -> Order:
        """Look up an order by its id (like A1001): its status, items and estimated delivery date."""
        order = ORDERS.get(order_id.strip().upper())
        if order is None:
            known = ", ".join(sorted(ORDERS))
            raise ToolError(f"no order with id {order_id!r}; order ids look like {known}")
        return order

    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--http", action="store_true", help=f"serve streamable HTTP at {MCP_PATH}, not stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    server = build_server()
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port, streamable_http_path=MCP_PATH)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
