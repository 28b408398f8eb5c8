"""Warm worker processes (one replica each), their model providers, and the supervisor."""
