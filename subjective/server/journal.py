"""Requests in flight, on disk: so a crash (SIGKILL, power loss) loses no usage.

A request is journaled at admission, before its engine runs anything, with what its record
needs (key, model, quality, threshold, its compute-table row); its token counts are
checkpointed while it runs (`CHECKPOINT_S`); its entry goes once its usage record is stored
(ledger or spool). Entries left by a process that is gone are closed on the next start
(`recover_interrupted`): one record each, the request's own if it had ended but neither the
ledger nor the spool took it (it is written here then), else status `interrupted`, billed
for the work its compute-table row shows (the table is a file in /dev/shm: it outlives the
process) or, for a model the plugin does not meter, for the tokens checkpointed. The
ledger's idempotency by request id makes a recovery that is itself interrupted, or an entry
closed late, harmless: exactly one record each.

One SQLite file (WAL, fsynced) may be shared by the servers of one machine: each entry names
its owner (pid and start time), and only entries of owners no longer running are recovered.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from subjective.server.ledger.record import UsageRecord
from subjective.server.ledger.sqlite_connect import connect

log = logging.getLogger(__name__)
CHECKPOINT_S = 0.5
DEFAULT_JOURNAL_PATH = Path("var/journal.sqlite3")

SCHEMA = """
CREATE TABLE IF NOT EXISTS in_flight (
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,           -- pid:start time of the server process
    entry TEXT NOT NULL,           -- JournalEntry as JSON
    counts TEXT NOT NULL,          -- the request's token counts, last checkpoint
    checkpointed_us INTEGER NOT NULL,
    record TEXT                    -- its usage record once it ended, until stored
);
"""


def process_owner(pid: int | None = None) -> str | None:
    """`pid:start time` of a running process (this one by default), None if it is gone: a
    recycled pid has another start time."""
    try:
        process = psutil.Process(pid)
        return f"{process.pid}:{process.create_time():.3f}"
    except psutil.Error:
        return None


@dataclass(frozen=True)
class JournalEntry:
    """What a request's record needs besides its progress."""

    request_id: str
    api_key_id: str
    model: str
    quality: str
    threshold: float | None
    started_at: datetime
    compute_table: str  # the compute-slots file the engine's worker writes into
    slot: int
    tag: int
    reserved: bool  # its worst case is held against the key's budget

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "started_at": self.started_at.isoformat()})

    @classmethod
    def from_json(cls, text: str) -> JournalEntry:
        data = json.loads(text)
        return cls(**{**data, "started_at": datetime.fromisoformat(data["started_at"])})


@dataclass(frozen=True)
class Orphan:
    """An entry whose server died (or stopped before storing its record): what recovery
    bills. `record`: the request's own, if it ended before its server stopped."""

    entry: JournalEntry
    counts: dict
    checkpointed_at: datetime
    record: UsageRecord | None


class Journal:
    def __init__(self, path: str | Path, owner: str | None = None) -> None:
        self.path = Path(path)
        self.owner = owner or process_owner() or f"{os.getpid()}:0"
        self._lock = threading.Lock()
        self._db = connect(self.path, SCHEMA)

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def open(self, entry: JournalEntry, counts: dict) -> None:
        """Durable before the request runs."""
        with self._locked() as db:
            db.execute(
                "INSERT OR REPLACE INTO in_flight VALUES (?, ?, ?, ?, ?, NULL)",
                (entry.request_id, self.owner, entry.to_json(), json.dumps(counts), _now_us()),
            )

    def checkpoint(self, progress: Mapping[str, dict]) -> None:
        """The latest token counts of running requests, in one transaction."""
        if not progress:
            return
        now = _now_us()
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "UPDATE in_flight SET counts = ?, checkpointed_us = ? WHERE request_id = ?",
                    ((json.dumps(counts), now, rid) for rid, counts in progress.items()),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def finish(self, record: UsageRecord) -> None:
        """The request ended: its record, until the ledger (or spool) has it."""
        with self._locked() as db:
            db.execute(
                "UPDATE in_flight SET record = ? WHERE request_id = ?",
                (json.dumps(record.to_dict()), record.request_id),
            )

    def close(self, request_id: str) -> None:
        """The request's record is stored (or it never ran): forget it."""
        with self._locked() as db:
            db.execute("DELETE FROM in_flight WHERE request_id = ?", (request_id,))

    def orphans(self) -> list[Orphan]:
        """Entries of servers no longer running."""
        with self._locked() as db:
            rows = db.execute(
                "SELECT owner, entry, counts, checkpointed_us, record FROM in_flight"
            ).fetchall()
        alive: dict[str, bool] = {}
        found = []
        for owner, entry, counts, checkpointed_us, record in rows:
            if owner not in alive:
                pid = int(owner.split(":", 1)[0])
                alive[owner] = owner == self.owner or process_owner(pid) == owner
            if not alive[owner]:
                found.append(
                    Orphan(
                        JournalEntry.from_json(entry),
                        json.loads(counts),
                        datetime.fromtimestamp(checkpointed_us / 1e6, UTC),
                        None if record is None else UsageRecord.from_dict(json.loads(record)),
                    )
                )
        return found

    def close_db(self) -> None:
        with self._locked() as db:
            db.close()


def _now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def open_journal(env: Mapping[str, str] | None = None) -> Journal:
    """At SUBJECTIVE_JOURNAL_PATH, else beside the spool (its parent folder), else var/."""
    env = os.environ if env is None else env
    if path := env.get("SUBJECTIVE_JOURNAL_PATH"):
        return Journal(path)
    if spool := env.get("SUBJECTIVE_SPOOL_DIR"):
        return Journal(Path(spool).parent / "journal.sqlite3")
    return Journal(DEFAULT_JOURNAL_PATH)
