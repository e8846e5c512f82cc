"""Writes usage records to the ledger from one thread, off the event loop.

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

from subjective.server.ledger import SpoolingLedger, UsageRecord, WriteResult
from subjective.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class UsageWriter:
    def __init__(self, ledger: SpoolingLedger, metrics: ServerMetrics) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self._queue: queue.Queue[tuple[UsageRecord, Future[WriteResult]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def submit(self, record: UsageRecord) -> Future[WriteResult]:
        done: Future[WriteResult] = Future()
        self._queue.put((record, done))
        return done

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            record, done = item
            start = time.perf_counter()
            try:
                result = self.ledger.record(record)
            except Exception as error:  # the spool itself failed: say so loudly
                log.exception("usage record %s could not be stored", record.request_id)
                self.metrics.observe_ledger_write(
                    seconds=time.perf_counter() - start, outcome="failed"
                )
                done.set_exception(error)
                continue
            self.metrics.observe_ledger_write(
                seconds=time.perf_counter() - start, outcome=result.value
            )
            done.set_result(result)

    def close(self) -> None:
        """Store every queued record, then stop."""
        self._queue.put(None)
        self._thread.join()
