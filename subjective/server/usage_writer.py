"""Writes usage records to the ledger from one thread, off the event loop; then releases the
request's budget reservation (its record counts instead; released after, so the request
never counts for nothing in between) and closes its journal entry.

A record neither the ledger nor its spool takes (Redis down and the spool's disk full) is
written into its request's journal entry and retried every `RETRY_S` while the server runs;
one still unstored when the server stops stays journaled, and the next start stores it.

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
RETRY_S = 1.0


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
        self._queue: queue.Queue[_Job | _Forget | None] = queue.Queue()
        self._unstored: list[_Job] = []  # retried every RETRY_S
        self._retry_at = 0.0
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
        while True:
            wait = max(0.0, self._retry_at - time.monotonic()) if self._unstored else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:  # time to retry
                item = False
            if item is None:
                break
            if isinstance(item, _Forget):
                self._close(item)
            elif isinstance(item, _Job):
                self._store(item)
            if self._unstored and time.monotonic() >= self._retry_at:
                self._retry()
        self._retry()
        for job in self._unstored:
            log.error("usage of %s left journaled for the next start", job.record.request_id)

    def _retry(self) -> None:
        unstored, self._unstored = self._unstored, []
        for job in unstored:
            self._store(job)

    def _journal(self, record: UsageRecord) -> None:
        try:
            self.journal.finish(record)
        except Exception:  # the journal still has the request's progress: billed anyway
            log.exception("final usage of %s not journaled", record.request_id)

    def _release(self, api_key_id: str, request_id: str) -> None:
        try:
            self.ledger.release(api_key_id, request_id)
        except Exception:  # it lapses at its expiry; meanwhile it holds budget, no more
            log.warning("reservation of %s not released; it lapses", request_id)

    def _close(self, request: _Forget) -> None:
        if request.reserved:
            self._release(request.api_key_id, request.request_id)
        self._forget_entry(request.request_id)

    def _forget_entry(self, request_id: str) -> None:
        try:
            self.journal.close(request_id)
        except Exception:  # the next start bills it again: a duplicate id, stored once
            log.exception("journal entry of %s not closed", request_id)

    def _store(self, job: _Job) -> None:
        record, done = job.record, job.done
        start = time.perf_counter()
        try:
            result = self.ledger.record(record)
        except Exception as error:  # the spool itself failed: say so loudly, then retry
            if not done.done():
                log.exception("usage record %s could not be stored", record.request_id)
                self._journal(record)  # until stored, a crash must not lose it
                done.set_exception(error)
            self.metrics.observe_ledger_write(seconds=time.perf_counter() - start, outcome="failed")
            if not self._unstored:
                self._retry_at = time.monotonic() + RETRY_S
            self._unstored.append(job)
            return
        self.metrics.observe_ledger_write(seconds=time.perf_counter() - start, outcome=result.value)
        if job.reserved:  # before the client hears back: its next request sees no stale hold
            self._release(record.api_key_id, record.request_id)
        if not done.done():
            done.set_result(result)
        # After: a crash in between bills the request again under its id, which the ledger
        # stores once.
        self._forget_entry(record.request_id)

    def close(self) -> None:
        """Store every queued record, then stop."""
        self._queue.put(None)
        self._thread.join()
