"""Billing export, exactly once per named cursor, across runs and crashes.

A run exports every event the cursor has not committed whose finished_at lies in the window
(events outside it stay uncommitted for a later run). With an output file the steps are:
  1. write the output to a temporary file and fsync it;
  2. save a journal in the ledger: the event ids, the output path and its sha256;
  3. rename the temporary file onto the output (the commit point) and mark the journal
     written;
  4. commit the events for the cursor (Redis: XACK), then clear the journal.
A run that finds a journal finishes the interrupted one first: if its output was renamed into
place (marked written, or the file there has the journal's hash), its events are committed
and not exported again; otherwise its output never appeared and its events, still
uncommitted, are exported now. To standard output (no file) the commit follows the write: a
crash in between exports those events again next time (the ids let a consumer drop them).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TextIO

from subjective.server.ledger.base import ExportJournal, Ledger
from subjective.server.ledger.durable import fsync_directory, write_synced
from subjective.server.ledger.formats import DEFAULT_SOURCE, WRITERS
from subjective.server.ledger.record import UsageRecord, utc

DEFAULT_CURSOR = "default"
LOCK_TTL_S = 3600.0


class ExportError(Exception):
    pass


@dataclass(frozen=True)
class ExportResult:
    exported: int  # events written by this run
    recovered: int  # events of an interrupted earlier run, found delivered and committed now
    output: Path | None


def export_usage(
    ledger: Ledger,
    format: str,
    output: Path | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str = DEFAULT_CURSOR,
    source: str = DEFAULT_SOURCE,
    stdout: TextIO | None = None,
) -> ExportResult:
    """Export what `cursor` has not exported yet with since <= finished_at < until."""
    since, until = (None if t is None else utc(t) for t in (since, until))
    if format not in WRITERS:
        raise ExportError(f"unknown format {format!r}: choose from {', '.join(WRITERS)}")
    with _locked(ledger, cursor):
        recovered = _finish_interrupted_run(ledger, cursor)
        if output is not None and output.exists():
            raise ExportError(f"{output} exists: refusing to overwrite an earlier export")
        events = [e for e in ledger.export_events(cursor) if _in_window(e.record, since, until)]
        ids = tuple(e.event_id for e in events)
        records = [e.record for e in events]
        if output is None:
            out = stdout or sys.stdout
            WRITERS[format](records, out, source)
            out.flush()
        else:
            _write_file(ledger, cursor, ids, records, format, source, output)
        ledger.export_commit(cursor, ids)
        ledger.save_journal(cursor, None)
    return ExportResult(len(ids), recovered, output)


def _write_file(
    ledger: Ledger,
    cursor: str,
    ids: tuple[str, ...],
    records: list[UsageRecord],
    format: str,
    source: str,
    output: Path,
) -> None:
    output = output.resolve()
    temporary = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    text = io.StringIO()
    WRITERS[format](records, text, source)
    data = text.getvalue().encode()
    write_synced(temporary, data)
    journal = ExportJournal(ids, str(output), hashlib.sha256(data).hexdigest())
    ledger.save_journal(cursor, journal)
    os.rename(temporary, output)
    fsync_directory(output.parent)
    ledger.save_journal(cursor, replace(journal, written=True))


def _finish_interrupted_run(ledger: Ledger, cursor: str) -> int:
    journal = ledger.load_journal(cursor)
    if journal is None:
        return 0
    delivered = journal.written or _sha256(Path(journal.output)) == journal.sha256
    if delivered:
        ledger.export_commit(cursor, journal.event_ids)
    ledger.save_journal(cursor, None)
    return len(journal.event_ids) if delivered else 0


@contextmanager
def _locked(ledger: Ledger, cursor: str) -> Iterator[None]:
    owner = f"{os.getpid()}-{uuid.uuid4().hex}"
    if not ledger.export_lock(cursor, owner, LOCK_TTL_S):
        raise ExportError(f"another export holds cursor {cursor!r}")
    try:
        yield
    finally:
        ledger.export_unlock(cursor, owner)


def _in_window(usage: UsageRecord, since: datetime | None, until: datetime | None) -> bool:
    return (since is None or usage.finished_at >= since) and (
        until is None or usage.finished_at < until
    )


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
