"""The ledger the server writes to: any backend, plus the spool when that backend is down."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime

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
from subjective.server.ledger.record import UsageRecord
from subjective.server.ledger.spool import Spool

log = logging.getLogger(__name__)


class SpoolingLedger(Ledger):
    """`record` never fails for unreachability: it spools (SPOOLED) and replays later.

    Replay runs in a background thread after `start()`, and otherwise on the next write
    that reaches the backend. After a failure, writes go straight to the spool for
    `backoff_s` so an outage does not make every request wait for a timeout. Reads and
    export go to the backend and raise LedgerUnavailable while it is down.
    """

    def __init__(self, inner: Ledger, spool: Spool, backoff_s: float = 1.0) -> None:
        self.inner = inner
        self.spool = spool
        self.backoff_s = backoff_s
        self._retry_at = 0.0
        self._replay_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, usage: UsageRecord) -> WriteResult:
        if time.monotonic() >= self._retry_at:
            try:
                result = self.inner.record(usage)
            except LedgerUnavailable as error:
                log.warning("ledger unavailable, spooling %s: %s", usage.request_id, error)
                self._retry_at = time.monotonic() + self.backoff_s
            else:
                if self._thread is None and self.spool.depth():
                    self.replay()
                return result
        self.spool.append(usage)
        return WriteResult.SPOOLED

    def replay(self) -> int:
        """Move spooled records into the backend, oldest first; returns how many moved."""
        with self._replay_lock:
            replayed = self.spool.replay(self.inner.record)
        if self.spool.depth():
            self._retry_at = time.monotonic() + self.backoff_s
        else:
            self._retry_at = 0.0
        if replayed:
            log.info("replayed %d spooled usage records", replayed)
        return replayed

    def spool_depth(self) -> int:
        """Records waiting on local disk (a gauge for /metrics)."""
        return self.spool.depth()

    def start(self, interval_s: float = 1.0) -> None:
        """Replay in a background thread every `interval_s` while anything is spooled."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._replay_loop, args=(interval_s,), name="ledger-spool-replay", daemon=True
        )
        self._thread.start()

    def _replay_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if self.spool.depth():
                    self.replay()
            except Exception:  # keep the replayer alive; the next round retries
                log.exception("spool replay failed")

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.inner.close()

    # Everything else is the backend's.

    def usage(self, query: UsageQuery) -> list[UsageRecord]:
        return self.inner.usage(query)

    def totals(
        self,
        api_key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Totals:
        return self.inner.totals(api_key_id, since, until)

    def reserve(self, reservation: Reservation) -> int | None:
        return self.inner.reserve(reservation)

    def release(self, api_key_id: str, request_id: str) -> None:
        self.inner.release(api_key_id, request_id)

    def ping(self) -> None:
        self.inner.ping()

    def export_events(self, cursor: str, batch: int = 500) -> Iterator[ExportEvent]:
        return self.inner.export_events(cursor, batch)

    def export_commit(self, cursor: str, event_ids: Sequence[str]) -> None:
        self.inner.export_commit(cursor, event_ids)

    def export_lock(self, cursor: str, owner: str, ttl_s: float) -> bool:
        return self.inner.export_lock(cursor, owner, ttl_s)

    def export_unlock(self, cursor: str, owner: str) -> None:
        self.inner.export_unlock(cursor, owner)

    def load_journal(self, cursor: str) -> ExportJournal | None:
        return self.inner.load_journal(cursor)

    def save_journal(self, cursor: str, journal: ExportJournal | None) -> None:
        self.inner.save_journal(cursor, journal)
