"""Outages: usage spools durably on local disk and replays exactly once when the ledger is back."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from subjective.server.ledger import (
    LedgerUnavailable,
    Spool,
    SpoolingLedger,
    Totals,
    UsageQuery,
    UsageRecord,
    WriteResult,
)
from subjective.server.ledger.redis_backend import RedisLedger
from subjective.server.ledger.sqlite_backend import SQLiteLedger
from tests import test_ledger
from tests.processes import free_port
from tests.redis_server import RedisServer
from tests.test_ledger import Backend, make_record

backend = test_ledger.backend  # the fixture: each test below runs on SQLite and on Redis

REPO = Path(__file__).resolve().parents[1]


def assert_exactly(ledger: SpoolingLedger, records: list[UsageRecord]) -> None:
    """Totals, stored records and the event stream each hold every record exactly once."""
    assert ledger.totals() == Totals.of(records)
    for key in {r.api_key_id for r in records}:
        assert ledger.totals(key) == Totals.of(r for r in records if r.api_key_id == key)
    stored = ledger.usage(UsageQuery(limit=100_000))
    assert sorted(stored, key=lambda r: r.request_id) == sorted(records, key=lambda r: r.request_id)
    events = [e.record.request_id for e in ledger.export_events("check")]
    assert sorted(events) == sorted(r.request_id for r in records)


def test_redis_stopped_then_restarted_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    inner = RedisLedger(server.url, socket_timeout_s=0.5)
    ledger = SpoolingLedger(inner, Spool(tmp_path / "spool"), backoff_s=0)
    try:
        before = [make_record(n, key=f"key_{n % 3}") for n in range(20)]
        assert {ledger.record(r) for r in before} == {WriteResult.RECORDED}
        server.stop(signal.SIGTERM)

        during = [make_record(n, key=f"key_{n % 3}") for n in range(20, 50)]
        started = time.monotonic()
        results = [ledger.record(r) for r in during + before[:5]]  # and retries of stored ones
        assert set(results) == {WriteResult.SPOOLED}
        assert time.monotonic() - started < 10
        assert ledger.spool_depth() == 35
        with pytest.raises(LedgerUnavailable):
            ledger.totals()

        server.restart()
        assert ledger.replay() == 35
        assert ledger.spool_depth() == 0
        assert_exactly(ledger, before + during)
    finally:
        ledger.close()
        server.stop()


def test_redis_killed_mid_run_under_concurrent_writes(tmp_path: Path) -> None:
    """Writers keep going while Redis is SIGKILLed and restarted on the same data."""
    server = RedisServer(tmp_path / "redis").start()
    ledger = SpoolingLedger(
        RedisLedger(server.url, socket_timeout_s=0.5), Spool(tmp_path / "spool"), backoff_s=0.05
    )
    records = [make_record(n, key=f"key_{n % 4}") for n in range(400)]
    results: list[WriteResult] = []

    def write(part: list[UsageRecord]) -> None:
        for record in part:
            results.append(ledger.record(record))
            time.sleep(0.002)

    threads = [threading.Thread(target=write, args=(records[i::4],)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        while len(results) < 100:
            time.sleep(0.005)
        server.stop(signal.SIGKILL)
        time.sleep(0.3)
        server.restart()
        for thread in threads:
            thread.join()
        assert WriteResult.SPOOLED in results and WriteResult.RECORDED in results
        ledger.replay()
        assert ledger.spool_depth() == 0
        assert_exactly(ledger, records)
    finally:
        ledger.close()
        server.stop()


def test_background_replayer_drains_the_spool(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    ledger = SpoolingLedger(
        RedisLedger(server.url, socket_timeout_s=0.5), Spool(tmp_path / "spool"), backoff_s=0.05
    )
    ledger.start(interval_s=0.05)
    try:
        server.stop()
        records = [make_record(n) for n in range(10)]
        assert {ledger.record(r) for r in records} == {WriteResult.SPOOLED}
        server.restart()
        deadline = time.monotonic() + 10
        while ledger.spool_depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.spool_depth() == 0
        assert_exactly(ledger, records)
    finally:
        ledger.close()
        server.stop()


def test_spool_survives_the_process_that_wrote_it(backend: Backend, tmp_path: Path) -> None:
    """A process spools (its ledger is unreachable) and dies by SIGKILL; another replays."""
    spool_dir = tmp_path / "spool"
    script = (
        "import os, signal, sys\n"
        "from subjective.server.ledger import Spool, SpoolingLedger, WriteResult\n"
        "from subjective.server.ledger.redis_backend import RedisLedger\n"
        "from tests.test_ledger import make_record\n"
        "ledger = SpoolingLedger(RedisLedger(sys.argv[1], retries=0), Spool(sys.argv[2]))\n"
        "for n in range(25):\n"
        "    assert ledger.record(make_record(n)) is WriteResult.SPOOLED\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    child = subprocess.run([sys.executable, "-c", script, dead_url, str(spool_dir)], cwd=REPO)
    assert child.returncode == -signal.SIGKILL

    assert Spool(spool_dir).depth() == 25
    ledger = SpoolingLedger(backend.open(), Spool(spool_dir))
    try:
        assert ledger.replay() == 25
        assert_exactly(ledger, [make_record(n) for n in range(25)])
    finally:
        ledger.close()


class SimulatedCrash(BaseException):
    pass


def test_crash_mid_replay_neither_loses_nor_double_counts(backend: Backend, tmp_path: Path) -> None:
    records = [make_record(n) for n in range(20)]
    spool = Spool(tmp_path / "spool")
    for record in records:
        spool.append(record)
    replayed: list[str] = []

    with backend.open() as ledger:

        def store_then_crash(record: UsageRecord) -> None:
            ledger.record(record)
            replayed.append(record.request_id)
            if len(replayed) == 7:  # stored, but its spool file not yet deleted
                raise SimulatedCrash

        with pytest.raises(SimulatedCrash):
            spool.replay(store_then_crash)
    assert replayed == [r.request_id for r in records[:7]]  # in spool order
    assert spool.depth() == 14

    fresh = SpoolingLedger(backend.open(), Spool(tmp_path / "spool"))
    try:
        assert fresh.replay() == 14
        assert_exactly(fresh, records)
    finally:
        fresh.close()


def test_locked_sqlite_spools_then_replays(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = SpoolingLedger(SQLiteLedger(path, busy_timeout_s=0.1), Spool(tmp_path / "spool"))
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        records = [make_record(n) for n in range(5)]
        assert {ledger.record(r) for r in records} == {WriteResult.SPOOLED}
        locker.execute("COMMIT")
        time.sleep(ledger.backoff_s)
        extra = make_record(99)
        assert ledger.record(extra) is WriteResult.RECORDED  # and replays the rest first
        assert ledger.spool_depth() == 0
        assert_exactly(ledger, [*records, extra])
    finally:
        locker.close()
        ledger.close()


def test_unreadable_spool_file_is_set_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append(make_record(1))
    (spool.directory / "00000000000000000000-garbage.json").write_text("{not json")
    stored: list[UsageRecord] = []
    assert spool.replay(stored.append) == 1
    assert stored == [make_record(1)]
    assert spool.depth() == 0
    assert [p.suffix for p in spool.directory.iterdir()] == [".corrupt"]


def test_temporary_left_by_a_dead_appender_is_adopted_once_stale(tmp_path: Path) -> None:
    """A process that died between fsync and rename left a whole record in a .tmp file."""
    spool = Spool(tmp_path / "spool")
    left = spool.append(make_record(1)).rename(spool.directory / "00000000000000000001-x.tmp")
    fresh = spool.directory / "99999999999999999999-y.tmp"  # an append still in progress
    fresh.write_text("{")
    stored: list[UsageRecord] = []
    assert spool.replay(stored.append) == 0  # not stale yet
    old = time.time() - 3600
    os.utime(left, (old, old))
    assert spool.replay(stored.append) == 1
    assert stored == [make_record(1)]
    assert fresh.exists() and not left.exists()


def test_redis_out_of_memory_spools_without_partial_writes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    ledger = SpoolingLedger(RedisLedger(server.url), Spool(tmp_path / "spool"), backoff_s=0)
    admin = redis.Redis.from_url(server.url)
    try:
        first = make_record(0)
        assert ledger.record(first) is WriteResult.RECORDED
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        assert ledger.record(make_record(1)) is WriteResult.SPOOLED
        assert ledger.totals() == Totals.of([first])  # the refused script wrote nothing
        admin.config_set("maxmemory", 0)
        assert ledger.replay() == 1
        assert_exactly(ledger, [first, make_record(1)])
    finally:
        admin.close()
        ledger.close()
        server.stop()
