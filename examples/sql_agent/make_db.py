"""Build ``shop.db``, the example database, from the SQL below: ``python -m examples.sql_agent.make_db``.

The built file is committed, so the agent runs without this step; run it again after changing the
SQL. The database is rebuilt from scratch (written beside, then moved over the old file).
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

DB_PATH = Path(__file__).with_name("shop.db")

SQL = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    city TEXT NOT NULL,
    joined_on TEXT NOT NULL  -- ISO date
);
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    stock INTEGER NOT NULL
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    ordered_at TEXT NOT NULL,  -- ISO date
    status TEXT NOT NULL CHECK (status IN ('placed', 'shipped', 'delivered', 'cancelled'))
);
CREATE TABLE order_items (
    order_id INTEGER NOT NULL REFERENCES orders(id),
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

INSERT INTO customers VALUES
    (1, 'Ada Lovelace', 'ada@example.com', 'London', '2024-01-08'),
    (2, 'Alan Turing', 'alan@example.com', 'Manchester', '2024-01-19'),
    (3, 'Grace Hopper', 'grace@example.com', 'New York', '2024-02-02'),
    (4, 'Edsger Dijkstra', 'edsger@example.com', 'Rotterdam', '2024-02-27'),
    (5, 'Barbara Liskov', 'barbara@example.com', 'Boston', '2024-03-11'),
    (6, 'Donald Knuth', 'don@example.com', 'Stanford', '2024-03-30'),
    (7, 'Margaret Hamilton', 'margaret@example.com', 'Boston', '2024-04-14'),
    (8, 'Ken Thompson', 'ken@example.com', 'New Jersey', '2024-05-06'),
    (9, 'Frances Allen', 'frances@example.com', 'New York', '2024-05-21'),
    (10, 'John McCarthy', 'john@example.com', 'Stanford', '2024-06-09'),
    (11, 'Radia Perlman', 'radia@example.com', 'Boston', '2024-07-01'),
    (12, 'Tim Berners-Lee', 'tim@example.com', 'London', '2024-07-23');

INSERT INTO products VALUES
    (1, 'KB-87', 'Mechanical keyboard', 'peripherals', 8900, 14),
    (2, 'MS-02', 'Wireless mouse', 'peripherals', 2900, 40),
    (3, 'PD-XL', 'Desk pad', 'accessories', 1900, 25),
    (4, 'MN-27', '27-inch monitor', 'displays', 24900, 6),
    (5, 'MN-32', '32-inch monitor', 'displays', 38900, 3),
    (6, 'HD-01', 'USB-C hub', 'peripherals', 4500, 18),
    (7, 'CM-HD', 'HD webcam', 'peripherals', 5900, 9),
    (8, 'HS-BT', 'Bluetooth headset', 'audio', 7900, 11),
    (9, 'SP-02', 'Desk speakers', 'audio', 6900, 0),
    (10, 'LS-AL', 'Laptop stand', 'accessories', 3900, 22),
    (11, 'CB-C2', 'USB-C cable, 2 m', 'accessories', 1200, 80),
    (12, 'CH-ER', 'Ergonomic chair', 'furniture', 32900, 4);

INSERT INTO orders VALUES
    (1001, 1, '2025-05-02', 'delivered'),
    (1002, 3, '2025-05-04', 'delivered'),
    (1003, 2, '2025-05-09', 'cancelled'),
    (1004, 5, '2025-05-13', 'delivered'),
    (1005, 1, '2025-05-20', 'shipped'),
    (1006, 7, '2025-05-22', 'shipped'),
    (1007, 4, '2025-05-27', 'delivered'),
    (1008, 9, '2025-06-01', 'shipped'),
    (1009, 6, '2025-06-03', 'placed'),
    (1010, 11, '2025-06-04', 'placed'),
    (1011, 3, '2025-06-05', 'placed'),
    (1012, 12, '2025-06-06', 'placed');

INSERT INTO order_items VALUES
    (1001, 1, 1, 8900),
    (1001, 11, 2, 1200),
    (1002, 4, 1, 24900),
    (1003, 12, 1, 32900),
    (1004, 2, 1, 2900),
    (1004, 3, 1, 1900),
    (1005, 5, 1, 38900),
    (1006, 8, 1, 7900),
    (1007, 6, 2, 4500),
    (1008, 10, 1, 3900),
    (1009, 7, 1, 5900),
    (1010, 1, 1, 8900),
    (1011, 2, 2, 2900),
    (1012, 12, 1, 32900);
"""


def build(path: Path = DB_PATH) -> Path:
    """Write the database to ``path``, replacing what is there; returns ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript(SQL)
        conn.commit()
    finally:
        conn.close()
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = build(Path(args[0]) if args else DB_PATH)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
