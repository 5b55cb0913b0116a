"""Per-account memory behind one interface (:class:`~.base.AccountStore`).

``open_store(config)`` gives the backend ``accounts.store`` names: ``sqlite`` (the
default, one file, one MX node; the daemon keeps its working state in memory in front of
it), ``redis`` (shared by several MX nodes), ``memory`` (tests; lost on restart).
"""
from __future__ import annotations

from ..config import AccountsConfig
from .base import AccountStore, StoreError

__all__ = ["AccountStore", "StoreError", "open_store"]


def open_store(config: AccountsConfig, *, daemon: bool = False) -> AccountStore:
    """The configured store; for the ``daemon``, SQLite is cached in memory (see
    state/cached.py), for the CLI it is read and written directly."""
    if config.store == "memory":
        from .memory import MemoryStore
        return MemoryStore(config)
    if config.store == "redis":
        from .redis import RedisStore
        return RedisStore(config)
    if daemon:
        from .cached import CachedSqliteStore
        return CachedSqliteStore(config)
    from .sqlite import SqliteStore
    return SqliteStore(config)
