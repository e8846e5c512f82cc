"""The in-flight journal and its recovery, without a server (the SIGKILL of a real one is in
test_server_crash.py): entries of dead owners are billed once as `interrupted`, live ones are
left alone, and tables of dead front ends are read back, then reclaimed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from subjective.model_registry.compute_slots import (
    COLUMNS,
    FIELDS,
    TABLE_PREFIX,
    ComputeCounts,
    read_left_row,
    reclaim_left_tables,
)
from subjective.model_registry.config import ModelConfig
from subjective.server.generation import TokenCounts
from subjective.server.journal import Journal, JournalEntry
from subjective.server.ledger import Pricing, Spool, SpoolingLedger, UsageQuery, UsageRecord
from subjective.server.ledger.redis_backend import RedisLedger
from subjective.server.ledger.sqlite_backend import SQLiteLedger
from subjective.server.meter import Meter
from subjective.server.metrics import ServerMetrics
from subjective.server.recovery import recover_interrupted
from subjective.server.usage_writer import UsageWriter
from tests.redis_server import RedisServer
from tests.test_ledger import make_record

PRICING = Pricing(default="0.0025")


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def entry(request_id: str, table: Path, slot: int = 3, tag: int = 77) -> JournalEntry:
    return JournalEntry(
        request_id=request_id,
        api_key_id="key_a",
        model="smollm2",
        quality="conservative",
        threshold=None,
        started_at=datetime.now(UTC),
        compute_table=str(table),
        slot=slot,
        tag=tag,
        reserved=False,
    )


def counts(completion: int) -> dict:
    return TokenCounts(prompt_lengths=[9], completion_tokens={0: completion}).to_dict()


def test_entries_of_dead_servers_are_billed_once_as_interrupted(
    tmp_path: Path, model_dir: Path
) -> None:
    path = tmp_path / "journal.sqlite3"
    dead = Journal(path, owner=f"{dead_pid()}:1.000")
    dead.open(entry("req-dense", tmp_path / "no-table.i64"), counts(0))
    dead.checkpoint({"req-dense": counts(5)})
    table = tmp_path / "table.i64"  # a metered request's row, as its worker left it
    rows = np.memmap(table, dtype=np.int64, mode="w+", shape=(8, COLUMNS))
    rows[3, 0], rows[3, 1:] = 77, np.arange(1, len(FIELDS) + 1) * 1000
    rows.flush()
    dead.open(entry("req-metered", table), counts(2))
    ended = make_record(3, key="key_a", finished=datetime.now(UTC))  # ended, then the crash
    dead.open(entry(ended.request_id, table), counts(1))
    dead.finish(ended)
    live = Journal(path)  # this process: running, so its entry is not an orphan
    live.open(entry("req-live", table), counts(1))

    ledger = SpoolingLedger(SQLiteLedger(tmp_path / "ledger.sqlite3"), Spool(tmp_path / "spool"))
    meter = Meter(ModelConfig.from_folder(model_dir), None)
    assert recover_interrupted(live, ledger, meter, PRICING) == 3
    assert recover_interrupted(live, ledger, meter, PRICING) == 0  # closed: not billed again
    records = {r.request_id: r for r in ledger.usage(UsageQuery())}
    assert set(records) == {"req-dense", "req-metered", ended.request_id}
    assert records.pop(ended.request_id) == ended  # its own record, as it ended
    assert {r.status.value for r in records.values()} == {"interrupted"}
    dense = records["req-dense"]
    assert dense.completion_tokens == 5  # the last checkpoint
    tally = TokenCounts.from_dict(counts(5)).tallies()
    assert dense.flops == meter.compute_of(None, tally).flops > 0
    metered = records["req-metered"]
    executed = ComputeCounts(*(np.arange(1, len(FIELDS) + 1) * 1000).tolist())
    assert metered.flops == executed.flops  # the worker's own count, from the left table
    # This process runs: another server sharing the journal leaves its entry alone too.
    assert Journal(path, owner="someone-else:0").orphans() == []


def test_left_tables_are_read_by_tag_then_reclaimed(tmp_path: Path) -> None:
    gone, here = dead_pid(), os.getpid()
    left = tmp_path / f"{TABLE_PREFIX}{gone}-abcd.i64"
    mine = tmp_path / f"{TABLE_PREFIX}{here}-abcd.i64"
    for path in (left, mine):
        rows = np.memmap(path, dtype=np.int64, mode="w+", shape=(4, COLUMNS))
        rows[1, 0], rows[1, 1:] = 5, 7
        rows.flush()
    assert read_left_row(left, 1, 5) == ComputeCounts(*([7] * len(FIELDS)))
    assert read_left_row(left, 1, 6) is None  # reused by another request since
    assert read_left_row(tmp_path / "missing.i64", 1, 5) is None
    assert reclaim_left_tables(tmp_path) == [left]
    assert mine.exists() and not left.exists()


def test_a_record_no_store_takes_is_retried_and_kept_journaled_meanwhile(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis down and the spool unwritable: the client is told, the record waits in the
    journal, and is stored once Redis is back; a server stopping meanwhile leaves it there."""
    spool_dir = tmp_path / "spool"
    ledger = SpoolingLedger(RedisLedger(redis_server.url), Spool(spool_dir), backoff_s=0)
    spool_dir.rmdir()
    spool_dir.write_text("not a folder: every spool write fails")
    journal = Journal(tmp_path / "journal.sqlite3")
    writer = UsageWriter(ledger, ServerMetrics(CollectorRegistry()), journal)
    record = make_record(1, finished=datetime.now(UTC))
    journal.open(entry(record.request_id, tmp_path / "no-table.i64"), counts(1))
    redis_server.stop(signal.SIGKILL)
    with pytest.raises(OSError):
        writer.submit(record).result(timeout=30)
    ended = Journal(tmp_path / "journal.sqlite3", owner=f"{dead_pid()}:0")
    [row] = ended._db.execute("SELECT record FROM in_flight").fetchall()
    assert UsageRecord.from_dict(json.loads(row[0])) == record  # safe from a crash now
    redis_server.restart()
    deadline = time.monotonic() + 30
    while not ledger.usage(UsageQuery()) and time.monotonic() < deadline:
        time.sleep(0.1)
    writer.close()
    assert ledger.usage(UsageQuery()) == [record]  # stored by a retry, once
    assert journal._db.execute("SELECT COUNT(*) FROM in_flight").fetchone()[0] == 0
