"""Persistence: one schema with migrations, on SQLite (embedded default) or PostgreSQL (by URL)."""

from .db import Store, database_url
from .keys import ApiKey, KeyCaps, KeyNotFound, generate_key

__all__ = ["ApiKey", "KeyCaps", "KeyNotFound", "Store", "database_url", "generate_key"]
