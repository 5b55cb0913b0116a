"""Per-account memory behind one interface (:class:`~.base.AccountStore`).

``open_store(config)`` gives the backend ``accounts.store`` names: ``sqlite`` (the
default, one file, one MX node), ``redis`` (shared by several MX nodes), ``memory``
(tests; lost on restart).
"""
from __future__ import annotations

from ..config import AccountsConfig
from .base import AccountStore, StoreError

__all__ = ["AccountStore", "StoreError", "open_store"]


def open_store(config: AccountsConfig) -> AccountStore:
    if config.store == "memory":
        from .memory import MemoryStore
        return MemoryStore(config)
    if config.store == "redis":
        from .redis import RedisStore
        return RedisStore(config)
    from .sqlite import SqliteStore
    return SqliteStore(config)
