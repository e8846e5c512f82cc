"""SQLite ledger: the embedded default for one machine (WAL, one transaction per write)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from subjective.server.ledger.base import (
    ExportEvent,
    ExportJournal,
    Ledger,
    LedgerUnavailable,
    Reservation,
    Totals,
    UsageQuery,
    WriteResult,
)
from subjective.server.ledger.record import UsageRecord, to_micros
from subjective.server.ledger.sqlite_connect import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- log order, the export cursor's position
    request_id TEXT NOT NULL UNIQUE,        -- the idempotency key
    api_key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    finished_us INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    flops INTEGER NOT NULL,
    dense_flops INTEGER NOT NULL,
    price_nanos INTEGER NOT NULL,
    record TEXT NOT NULL                    -- the whole record, canonical JSON
);
CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (api_key_id, finished_us, request_id);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (finished_us, request_id);
CREATE TABLE IF NOT EXISTS export_acks (
    cursor TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (cursor, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS export_journal (cursor TEXT PRIMARY KEY, journal TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT PRIMARY KEY,
    api_key_id TEXT NOT NULL,
    flops INTEGER NOT NULL,
    expires_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (api_key_id);
CREATE TABLE IF NOT EXISTS export_locks (
    cursor TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_us INTEGER NOT NULL
);
"""

# Sums of 64-bit FLOP counts can pass 2^63: sum the giga part and the remainder apart.
GIGA = 1_000_000_000
TOTALS_SQL = f"""
SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
       SUM(flops / {GIGA}), SUM(flops % {GIGA}),
       SUM(dense_flops / {GIGA}), SUM(dense_flops % {GIGA}), SUM(price_nanos)
FROM usage
"""


class SQLiteLedger(Ledger):
    """One connection per object, serialised by a lock; other processes may share the file."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = connect(self.path, SCHEMA, busy_timeout_s)
        except sqlite3.OperationalError as error:
            raise LedgerUnavailable(f"sqlite ledger {self.path}: {error}") from error

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as error:  # locked, busy, I/O: retry later
                raise LedgerUnavailable(f"sqlite ledger {self.path}: {error}") from error

    def record(self, usage: UsageRecord) -> WriteResult:
        with self._guard():
            cursor = self._db.execute(
                "INSERT INTO usage (request_id, api_key_id, model, finished_us, prompt_tokens,"
                " completion_tokens, flops, dense_flops, price_nanos, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (
                    usage.request_id,
                    usage.api_key_id,
                    usage.model,
                    usage.finished_us,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.flops,
                    usage.dense_flops,
                    usage.price_nanos,
                    json.dumps(usage.to_dict()),
                ),
            )
        return WriteResult.RECORDED if cursor.rowcount == 1 else WriteResult.DUPLICATE

    def usage(self, query: UsageQuery) -> list[UsageRecord]:
        where, params = _where(query.api_key_id, query.since, query.until)
        if query.model is not None:
            where.append("model = ?")
            params.append(query.model)
        order = "DESC" if query.descending else "ASC"
        sql = (
            f"SELECT record FROM usage {_clause(where)}"
            f" ORDER BY finished_us {order}, request_id {order} LIMIT ?"
        )
        with self._guard():
            rows = self._db.execute(sql, [*params, query.limit]).fetchall()
        return [UsageRecord.from_dict(json.loads(row[0])) for row in rows]

    def totals(
        self,
        api_key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Totals:
        where, params = _where(api_key_id, since, until)
        with self._guard():
            row = self._db.execute(TOTALS_SQL + _clause(where), params).fetchone()
        count, prompt, completion, flops_g, flops_r, dense_g, dense_r, price = (
            int(value or 0) for value in row
        )
        return Totals(
            count, prompt, completion, flops_g * GIGA + flops_r, dense_g * GIGA + dense_r, price
        )

    def reserve(self, reservation: Reservation) -> int | None:
        r = reservation
        now = to_micros(datetime.now(UTC))
        with self._guard(), self._transaction():  # BEGIN IMMEDIATE: one admission at a time
            self._db.execute("DELETE FROM reservations WHERE expires_us <= ?", (now,))
            giga, rest = self._db.execute(
                f"SELECT COALESCE(SUM(flops / {GIGA}), 0), COALESCE(SUM(flops % {GIGA}), 0)"
                " FROM usage WHERE api_key_id = ? AND finished_us >= ? AND finished_us < ?",
                (r.api_key_id, to_micros(r.since), to_micros(r.until)),
            ).fetchone()
            held = self._db.execute(
                "SELECT COALESCE(SUM(flops), 0) FROM reservations"
                " WHERE api_key_id = ? AND request_id != ?",
                (r.api_key_id, r.request_id),
            ).fetchone()[0]
            committed = int(giga) * GIGA + int(rest) + int(held)
            if committed >= r.budget:
                return committed
            self._db.execute(
                "INSERT OR REPLACE INTO reservations (request_id, api_key_id, flops, expires_us)"
                " VALUES (?, ?, ?, ?)",
                (r.request_id, r.api_key_id, r.flops, to_micros(r.expires_at)),
            )
        return None

    def release(self, api_key_id: str, request_id: str) -> None:
        with self._guard():
            self._db.execute(
                "DELETE FROM reservations WHERE request_id = ? AND api_key_id = ?",
                (request_id, api_key_id),
            )

    def ping(self) -> None:
        with self._guard():
            self._db.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def export_events(self, cursor: str, batch: int = 500) -> Iterator[ExportEvent]:
        last = 0
        while True:
            with self._guard():
                rows = self._db.execute(
                    "SELECT seq, record FROM usage u WHERE seq > ? AND NOT EXISTS"
                    " (SELECT 1 FROM export_acks a WHERE a.cursor = ? AND a.seq = u.seq)"
                    " ORDER BY seq LIMIT ?",
                    (last, cursor, batch),
                ).fetchall()
            if not rows:
                return
            for seq, record in rows:
                yield ExportEvent(str(seq), UsageRecord.from_dict(json.loads(record)))
            last = rows[-1][0]

    def export_commit(self, cursor: str, event_ids: Sequence[str]) -> None:
        with self._guard(), self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO export_acks (cursor, seq) VALUES (?, ?)",
                ((cursor, int(event_id)) for event_id in event_ids),
            )

    def export_lock(self, cursor: str, owner: str, ttl_s: float) -> bool:
        now = to_micros(datetime.now(UTC))
        with self._guard(), self._transaction():
            self._db.execute(
                "DELETE FROM export_locks WHERE cursor = ? AND (expires_us <= ? OR owner = ?)",
                (cursor, now, owner),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO export_locks (cursor, owner, expires_us) VALUES (?, ?, ?)",
                (cursor, owner, now + int(ttl_s * 1_000_000)),
            )
            row = self._db.execute(
                "SELECT owner FROM export_locks WHERE cursor = ?", (cursor,)
            ).fetchone()
        return row[0] == owner

    def export_unlock(self, cursor: str, owner: str) -> None:
        with self._guard():
            self._db.execute(
                "DELETE FROM export_locks WHERE cursor = ? AND owner = ?", (cursor, owner)
            )

    def load_journal(self, cursor: str) -> ExportJournal | None:
        with self._guard():
            row = self._db.execute(
                "SELECT journal FROM export_journal WHERE cursor = ?", (cursor,)
            ).fetchone()
        return None if row is None else ExportJournal.from_json(row[0])

    def save_journal(self, cursor: str, journal: ExportJournal | None) -> None:
        with self._guard():
            if journal is None:
                self._db.execute("DELETE FROM export_journal WHERE cursor = ?", (cursor,))
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO export_journal (cursor, journal) VALUES (?, ?)",
                    (cursor, journal.to_json()),
                )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _where(
    api_key_id: str | None, since: datetime | None, until: datetime | None
) -> tuple[list[str], list[object]]:
    where: list[str] = []
    params: list[object] = []
    if api_key_id is not None:
        where.append("api_key_id = ?")
        params.append(api_key_id)
    if since is not None:
        where.append("finished_us >= ?")
        params.append(to_micros(since))
    if until is not None:
        where.append("finished_us < ?")
        params.append(to_micros(until))
    return where, params


def _clause(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""
