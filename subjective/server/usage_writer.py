"""Writes usage records to the ledger from one thread, off the event loop; then releases the
request's budget reservation (its record counts instead; released after, so the request
never counts for nothing in between) and closes its journal entry (once stored, a crash
cannot lose it; a record the spool failed to take stays journaled, for the next start).

A request hands its record over with `submit`, which never blocks and never raises: that
matters on a cancelled stream, where the request's task may not await anything any more.
Completed requests await the returned future, so their record is stored (or spooled) before
the client sees the end of the response. `close` writes everything still queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from subjective.server.journal import Journal
from subjective.server.ledger import SpoolingLedger, UsageRecord, WriteResult
from subjective.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    record: UsageRecord
    done: Future[WriteResult]
    reserved: bool


@dataclass(frozen=True)
class _Forget:
    api_key_id: str
    request_id: str
    reserved: bool


class UsageWriter:
    def __init__(self, ledger: SpoolingLedger, metrics: ServerMetrics, journal: Journal) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.journal = journal
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def submit(self, record: UsageRecord, *, reserved: bool = False) -> Future[WriteResult]:
        """Store `record`; with `reserved`, release its request's reservation after."""
        done: Future[WriteResult] = Future()
        self._queue.put(_Job(record, done, reserved))
        return done

    def forget(self, api_key_id: str, request_id: str, *, reserved: bool) -> None:
        """A request that leaves no record (it never ran): release its reservation (if
        `reserved`) and close its journal entry."""
        self._queue.put(_Forget(api_key_id, request_id, reserved))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, _Forget):
                self._close(item)
            else:
                self._store(item)

    def _close(self, request: _Forget) -> None:
        if request.reserved:
            try:
                self.ledger.release(request.api_key_id, request.request_id)
            except Exception:  # it lapses at its expiry; meanwhile it holds budget, no more
                log.warning("reservation of %s not released; it lapses", request.request_id)
        try:
            self.journal.close(request.request_id)
        except Exception:  # recovered on the next start: its record is stored, no double
            log.exception("journal entry of %s not closed", request.request_id)

    def _store(self, job: _Job) -> None:
        record, done = job.record, job.done
        start = time.perf_counter()
        try:
            result = self.ledger.record(record)
        except Exception as error:  # the spool itself failed: say so loudly
            log.exception("usage record %s could not be stored", record.request_id)
            self.metrics.observe_ledger_write(seconds=time.perf_counter() - start, outcome="failed")
            done.set_exception(error)
            return
        self.metrics.observe_ledger_write(seconds=time.perf_counter() - start, outcome=result.value)
        # Before the client hears back: its next request sees no stale hold.
        self._close(_Forget(record.api_key_id, record.request_id, job.reserved))
        done.set_result(result)

    def close(self) -> None:
        """Store every queued record, then stop."""
        self._queue.put(None)
        self._thread.join()
