"""A SQL agent over a small shop database (SQLite, read-only)."""
