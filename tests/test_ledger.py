"""The ledger's contract, held to both backends (SQLite, and Redis on a real redis-server)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from subjective.server.ledger import (
    Ledger,
    Pricing,
    Reservation,
    Status,
    Totals,
    UsageQuery,
    UsageRecord,
    WriteResult,
    open_ledger,
)
from subjective.server.ledger.redis_backend import RedisLedger
from subjective.server.ledger.sqlite_backend import SQLiteLedger
from tests.redis_server import RedisServer

T0 = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)


def make_record(
    n: int,
    key: str = "key_a",
    model: str = "smollm2",
    finished: datetime | None = None,
    flops: int | None = None,
    status: Status = Status.COMPLETED,
) -> UsageRecord:
    finished = finished or T0 + timedelta(seconds=n)
    flops = 1_000_003 * (n + 1) if flops is None else flops
    return UsageRecord(
        request_id=f"req-{n:06d}",
        api_key_id=key,
        model=model,
        quality="aggressive" if n % 2 else "conservative",
        threshold=0.75 if n % 3 else None,
        prompt_tokens=10 + n,
        completion_tokens=5 + n % 7,
        flops=flops,
        dense_flops=2 * flops,
        kv_entries=100 + n,
        kv_entries_dense=200 + n,
        state_bytes=147_456 * (n % 2),  # a hybrid's recurrent state, every other record
        price_nanos=Pricing(default="0.0025").price_nanos(model, flops),
        started_at=finished - timedelta(milliseconds=250),
        finished_at=finished,
        status=status,
    )


@dataclass
class Backend:
    name: str
    open: Callable[[], Ledger]  # a new object (connection) on the same store
    redis: RedisServer | None = None


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        yield Backend("sqlite", lambda: SQLiteLedger(path))
        return
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield Backend("redis", lambda: RedisLedger(server.url), server)
    finally:
        server.stop()


@pytest.fixture
def ledger(backend: Backend) -> Iterator[Ledger]:
    with backend.open() as opened:
        yield opened


def test_write_then_read_back(ledger: Ledger) -> None:
    record = make_record(1, status=Status.CANCELLED)
    assert ledger.record(record) is WriteResult.RECORDED
    assert ledger.usage(UsageQuery(api_key_id="key_a")) == [record]
    assert ledger.totals("key_a") == Totals.of([record])


def test_retried_write_counts_once(backend: Backend, ledger: Ledger) -> None:
    record = make_record(7)
    assert ledger.record(record) is WriteResult.RECORDED
    assert ledger.record(record) is WriteResult.DUPLICATE
    with backend.open() as other:  # a retry from another replica
        assert other.record(record) is WriteResult.DUPLICATE
    assert ledger.totals("key_a") == Totals.of([record])
    assert ledger.totals() == Totals.of([record])
    assert ledger.usage(UsageQuery()) == [record]
    assert [e.record for e in ledger.export_events("audit")] == [record]  # one stream entry


def test_concurrent_writers_give_exact_totals(backend: Backend) -> None:
    """8 writers, each on its own connection; every record is written by two of them."""
    records = [make_record(n, key=f"key_{n % 3}") for n in range(240)]
    writers, barrier = 8, threading.Barrier(8)
    results: list[WriteResult] = []
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            with backend.open() as ledger:
                mine = [r for i, r in enumerate(records) if i % (writers // 2) == worker // 2]
                barrier.wait(timeout=30)
                results.extend(ledger.record(r) for r in mine)
        except BaseException as error:  # surfaced below
            barrier.abort()  # never leave the others waiting
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results.count(WriteResult.RECORDED) == len(records)
    assert results.count(WriteResult.DUPLICATE) == len(records)
    with backend.open() as ledger:
        assert ledger.totals() == Totals.of(records)
        for key in ("key_0", "key_1", "key_2"):
            assert ledger.totals(key) == Totals.of(r for r in records if r.api_key_id == key)
        assert len(ledger.usage(UsageQuery(limit=10_000))) == len(records)
        assert len(list(ledger.export_events("audit"))) == len(records)


def test_usage_filters_by_key_model_and_time(ledger: Ledger) -> None:
    records = [
        make_record(n, key=f"key_{n % 2}", model="dense" if n % 3 == 0 else "sdt")
        for n in range(30)
    ]
    for record in reversed(records):
        ledger.record(record)

    def ids(query: UsageQuery) -> list[str]:
        return [r.request_id for r in ledger.usage(query)]

    assert ids(UsageQuery(limit=100)) == [r.request_id for r in records]  # ordered by time
    assert ids(UsageQuery(api_key_id="key_1")) == [
        r.request_id for r in records if r.api_key_id == "key_1"
    ]
    since, until = T0 + timedelta(seconds=5), T0 + timedelta(seconds=20)
    expected = [
        r.request_id
        for r in records
        if r.api_key_id == "key_0" and r.model == "dense" and since <= r.finished_at < until
    ]
    query = UsageQuery(api_key_id="key_0", model="dense", since=since, until=until)
    assert ids(query) == expected
    assert ids(UsageQuery(limit=3, descending=True)) == ["req-000029", "req-000028", "req-000027"]
    assert ids(UsageQuery(model="sdt", limit=2)) == ["req-000001", "req-000002"]
    assert ids(UsageQuery(api_key_id="nobody")) == []


def test_totals_over_periods_match_the_records(ledger: Ledger) -> None:
    """Windows aligned and not aligned to hours, open at either end, and empty."""
    start = datetime(2026, 3, 1, tzinfo=UTC)
    records = [
        make_record(n, key=f"key_{n % 2}", finished=start + timedelta(minutes=17 * n, seconds=n))
        for n in range(60)  # about 17 hours
    ]
    for record in records:
        ledger.record(record)
    edges = [
        None,
        start,
        start + timedelta(hours=3),
        start + timedelta(hours=3, minutes=20, microseconds=1),
        start + timedelta(minutes=17 * 10, seconds=10),  # exactly on a record
        start + timedelta(hours=9, minutes=59, seconds=59),
        start + timedelta(days=2),
    ]
    for key in (None, "key_0", "key_1"):
        for since in edges:
            for until in edges:
                expected = Totals.of(
                    r
                    for r in records
                    if (key is None or r.api_key_id == key)
                    and (since is None or r.finished_at >= since)
                    and (until is None or r.finished_at < until)
                )
                assert ledger.totals(key, since, until) == expected, (key, since, until)


def test_flop_sums_past_64_bits_stay_exact(ledger: Ledger) -> None:
    big = 2**61 + 12345
    records = [make_record(n, flops=big) for n in range(5)]
    for record in records:
        ledger.record(record)
    totals = ledger.totals("key_a", since=T0 - timedelta(days=1))
    assert totals.flops == 5 * big > 2**62
    assert totals.dense_flops == 10 * big > 2**63
    assert ledger.totals() == Totals.of(records)


def test_record_round_trips_through_its_stored_forms() -> None:
    record = make_record(3)
    assert UsageRecord.from_dict(record.to_dict()) == record
    assert UsageRecord.from_dict(record.to_fields()) == record
    no_threshold = replace(record, threshold=None)
    assert UsageRecord.from_dict(no_threshold.to_fields()) == no_threshold
    older = {k: v for k, v in record.to_fields().items() if k != "state_bytes"}
    assert UsageRecord.from_dict(older) == replace(record, state_bytes=0)  # stored before it


def test_record_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="naive"):
        replace(make_record(1), finished_at=datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        replace(make_record(1), flops=1.5e9)
    with pytest.raises(ValueError):
        replace(make_record(1), prompt_tokens=-1)
    with pytest.raises(ValueError):
        replace(make_record(1), status="finished")
    with pytest.raises(ValueError):
        replace(make_record(1), started_at=T0 + timedelta(days=1))


def test_price_is_exact_decimal() -> None:
    pricing = Pricing({"sdt": "0.0025", "dense": Decimal("0.004")})
    # 0.027 TFLOP at 0.0025 per TFLOP = 0.0000675: exact in nano-units
    assert pricing.price_nanos("sdt", 27_000_000_000) == 67_500
    assert pricing.price_nanos("dense", 3 * 10**12) == 12_000_000
    assert pricing.price_nanos("sdt", 1) == 0  # 2.5e-15 rounds to zero nanos
    assert pricing.price_nanos("sdt", 200_000) == 1  # 0.5 nano rounds half up
    record = replace(make_record(1), price_nanos=pricing.price_nanos("sdt", 10**15 + 7_000_000))
    assert record.price == Decimal("2.500000018")  # 2.5000000175 rounded half up
    assert record.to_dict()["price"] == "2.500000018"
    with pytest.raises(KeyError):
        pricing.price_nanos("unknown", 1)
    with pytest.raises(TypeError):
        Pricing({"sdt": 0.0025})  # type: ignore[dict-item]


def test_open_ledger_follows_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ledger.sqlite3"
    with open_ledger({"SUBJECTIVE_LEDGER_PATH": str(path)}) as ledger:
        assert isinstance(ledger, SQLiteLedger)
    assert path.exists()
    with open_ledger({"REDIS_URL": "redis://127.0.0.1:1/0"}) as ledger:
        assert isinstance(ledger, RedisLedger)


# Budget reservations: admission is atomic under concurrency, so a budget is overshot by at
# most one request's reservation, and records replace reservations.

NOW = datetime.now(UTC)
WINDOW = (NOW - timedelta(hours=1), NOW + timedelta(hours=1))


def reservation(request_id: str, flops: int, budget: int, **changes) -> Reservation:
    fields = dict(
        request_id=request_id,
        api_key_id="key_a",
        flops=flops,
        budget=budget,
        since=WINDOW[0],
        until=WINDOW[1],
        expires_at=NOW + timedelta(hours=1),
    )
    return Reservation(**{**fields, **changes})


def test_concurrent_admissions_overshoot_by_at_most_one_reservation(backend: Backend) -> None:
    """16 threads, each on its own connection, race for a budget of 3.5 reservations."""
    flops, budget, racers = 1_000, 3_500, 16
    barrier = threading.Barrier(racers)
    admitted: list[str] = []
    errors: list[BaseException] = []

    def race(worker: int) -> None:
        try:
            with backend.open() as ledger:
                barrier.wait(timeout=30)
                if ledger.reserve(reservation(f"req-{worker}", flops, budget)) is None:
                    admitted.append(f"req-{worker}")
        except BaseException as error:  # surfaced below
            barrier.abort()
            errors.append(error)

    threads = [threading.Thread(target=race, args=(w,)) for w in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    # Admitted while under budget: 0, 1000, 2000, 3000 held < 3500, then 4000 >= 3500.
    assert len(admitted) == 4
    assert len(admitted) * flops - budget <= flops


def test_a_record_replaces_its_reservation(ledger: Ledger) -> None:
    assert ledger.reserve(reservation("req-000001", 5_000, 6_000)) is None
    assert ledger.reserve(reservation("req-000002", 5_000, 6_000)) is None  # 5000 < 6000
    assert ledger.reserve(reservation("other", 1, 6_000)) == 10_000  # held by both
    # The first one ran less than its worst case: its record counts, its hold goes.
    ledger.record(make_record(1, finished=NOW, flops=700))
    ledger.release("key_a", "req-000001")
    assert ledger.reserve(reservation("other", 1, 5_700)) == 5_700
    ledger.release("key_a", "req-000002")
    assert ledger.reserve(reservation("other", 1, 5_700)) is None
    ledger.release("key_a", "unknown")  # harmless


def test_spend_outside_the_window_and_other_keys_do_not_count(ledger: Ledger) -> None:
    ledger.record(make_record(1, finished=WINDOW[0] - timedelta(hours=2), flops=10**9))
    ledger.record(make_record(2, key="key_b", finished=NOW, flops=10**9))
    assert ledger.reserve(reservation("req", 10, 100)) is None


def test_reserving_twice_holds_once_and_lapsed_reservations_stop_holding(ledger: Ledger) -> None:
    assert ledger.reserve(reservation("req", 60, 100)) is None
    assert ledger.reserve(reservation("req", 60, 100)) is None  # a retry of the same request
    assert ledger.reserve(reservation("other", 1, 100)) is None  # 60 held, not 120
    lapsed = reservation("crashed", 10**6, 10**9, expires_at=NOW - timedelta(seconds=1))
    assert ledger.reserve(lapsed) is None
    assert ledger.reserve(reservation("next", 1, 61)) == 61  # the lapsed one is gone
