"""Which ledger to use, from the environment: Redis when REDIS_URL is set, else SQLite."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from subjective.server.ledger.base import Ledger
from subjective.server.ledger.spool import Spool
from subjective.server.ledger.spooling import SpoolingLedger

DEFAULT_LEDGER_PATH = Path("var/ledger.sqlite3")
DEFAULT_SPOOL_DIR = Path("var/spool")


def open_ledger(env: Mapping[str, str] | None = None) -> Ledger:
    """The backend alone: REDIS_URL, else SQLite at SUBJECTIVE_LEDGER_PATH."""
    env = os.environ if env is None else env
    if url := env.get("REDIS_URL"):
        from subjective.server.ledger.redis_backend import RedisLedger

        return RedisLedger(url)
    from subjective.server.ledger.sqlite_backend import SQLiteLedger

    return SQLiteLedger(env.get("SUBJECTIVE_LEDGER_PATH") or DEFAULT_LEDGER_PATH)


def open_server_ledger(env: Mapping[str, str] | None = None) -> SpoolingLedger:
    """What the server writes to: the backend plus a spool at SUBJECTIVE_SPOOL_DIR.

    Call `.start()` to replay in the background and `.close()` at shutdown.
    """
    env = os.environ if env is None else env
    spool = Spool(env.get("SUBJECTIVE_SPOOL_DIR") or DEFAULT_SPOOL_DIR)
    return SpoolingLedger(open_ledger(env), spool)
