"""Open a SQLite database in WAL mode with its schema, safely from many threads or processes.

Several connections creating the same fresh database at once can get "database is locked"
at once, without SQLite's busy handler waiting (switching to WAL, creating tables): retry
that for up to the busy timeout.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path


def connect(path: Path, schema: str, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """Autocommit connection (one statement, one transaction), usable from any thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # billing data: survive power loss
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(random.uniform(0.005, 0.05))
