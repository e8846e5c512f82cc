"""Durable local spool: usage the ledger could not take, one fsynced file per record.

A file appears by atomic rename after its bytes and its directory entry are on disk, so a
crash leaves either a whole record or nothing. Names sort in spool order (time, pid, count).
Replay stores a record, then deletes its file: a crash in between replays it again, which the
ledger's request-id idempotency makes harmless. Any process may replay any file; a
temporary file left by a process that died before its rename is adopted once it is stale.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from subjective.server.ledger.base import LedgerUnavailable
from subjective.server.ledger.durable import fsync_directory, write_synced
from subjective.server.ledger.record import UsageRecord

log = logging.getLogger(__name__)
SUFFIX = ".json"
TEMPORARY = ".tmp"
STALE_TEMPORARY_S = 60.0  # far longer than any append takes


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def append(self, usage: UsageRecord) -> Path:
        with self._lock:
            name = f"{time.time_ns():020d}-{os.getpid():08d}-{next(self._counter):012d}"
        final = self.directory / (name + SUFFIX)
        temporary = self.directory / (name + TEMPORARY)
        try:
            write_synced(temporary, json.dumps(usage.to_dict()).encode())
        except OSError:  # a full disk, say: leave no torn file behind
            temporary.unlink(missing_ok=True)
            raise
        os.rename(temporary, final)
        fsync_directory(self.directory)
        return final

    def files(self) -> list[Path]:
        """Spooled records, oldest first."""
        return sorted(self.directory.glob("*" + SUFFIX))

    def depth(self) -> int:
        return sum(1 for _ in self.directory.glob("*" + SUFFIX))

    def replay(self, store: Callable[[UsageRecord], object]) -> int:
        """Store each spooled record in order, deleting its file once stored. Stops quietly
        at the first LedgerUnavailable; returns how many were replayed."""
        self._adopt_stale_temporaries()
        replayed = 0
        for path in self.files():
            try:
                usage = UsageRecord.from_dict(json.loads(path.read_bytes()))
            except FileNotFoundError:  # another replayer got there first
                continue
            except (ValueError, KeyError, TypeError):  # not written by `append`: keep, skip
                log.error("unreadable spool file %s: renamed to .corrupt", path)
                with contextlib.suppress(FileNotFoundError):
                    path.rename(path.with_suffix(".corrupt"))
                continue
            try:
                store(usage)
            except LedgerUnavailable:
                break
            path.unlink(missing_ok=True)
            replayed += 1
        if replayed:
            fsync_directory(self.directory)
        return replayed

    def _adopt_stale_temporaries(self) -> None:
        """A stale temporary file was fsynced or torn: spool it (replay sets torn ones aside)."""
        cutoff = time.time() - STALE_TEMPORARY_S
        for path in self.directory.glob("*" + TEMPORARY):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.rename(path.with_suffix(SUFFIX))
