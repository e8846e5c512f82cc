"""Billing export: each event once per cursor, across runs and crashes; the three formats."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from subjective.server.ledger import ExportError, Ledger, UsageRecord, export_usage
from subjective.server.ledger.cli import register
from subjective.server.ledger.formats import CSV_COLUMNS
from tests import test_ledger
from tests.test_ledger import Backend, make_record

backend, ledger = test_ledger.backend, test_ledger.ledger  # fixtures: SQLite and Redis


class SimulatedCrash(BaseException):
    pass


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines()]


def fill(ledger: Ledger, numbers: range, **kwargs: object) -> list[UsageRecord]:
    records = [make_record(n, **kwargs) for n in numbers]  # type: ignore[arg-type]
    for record in records:
        ledger.record(record)
    return records


def test_each_event_is_exported_once_across_runs(ledger: Ledger, tmp_path: Path) -> None:
    first = fill(ledger, range(5))
    assert export_usage(ledger, "jsonl", tmp_path / "1.jsonl").exported == 5
    second = fill(ledger, range(5, 8))
    fill(ledger, range(3))  # retried writes add no events
    assert export_usage(ledger, "jsonl", tmp_path / "2.jsonl").exported == 3
    assert export_usage(ledger, "jsonl", tmp_path / "3.jsonl").exported == 0
    assert ids_in(tmp_path / "1.jsonl") == [r.request_id for r in first]
    assert ids_in(tmp_path / "2.jsonl") == [r.request_id for r in second]
    assert (tmp_path / "3.jsonl").read_text() == ""


def test_cursors_are_independent(ledger: Ledger, tmp_path: Path) -> None:
    fill(ledger, range(4))
    assert export_usage(ledger, "jsonl", tmp_path / "a.jsonl", cursor="openmeter").exported == 4
    assert export_usage(ledger, "jsonl", tmp_path / "b.jsonl", cursor="finance").exported == 4
    assert export_usage(ledger, "jsonl", tmp_path / "c.jsonl", cursor="openmeter").exported == 0


def test_window_leaves_other_events_for_a_later_run(ledger: Ledger, tmp_path: Path) -> None:
    january = fill(ledger, range(0, 4), finished=None)
    february = [
        make_record(n, finished=datetime(2026, 2, 3, tzinfo=UTC) + timedelta(minutes=n))
        for n in range(10, 13)
    ]
    for record in february:
        ledger.record(record)
    feb_1 = datetime(2026, 2, 1, tzinfo=UTC)
    export_usage(ledger, "jsonl", tmp_path / "feb.jsonl", since=feb_1)
    export_usage(ledger, "jsonl", tmp_path / "jan.jsonl", until=feb_1)
    export_usage(ledger, "jsonl", tmp_path / "rest.jsonl")
    assert ids_in(tmp_path / "feb.jsonl") == [r.request_id for r in february]
    assert ids_in(tmp_path / "jan.jsonl") == [r.request_id for r in january]
    assert ids_in(tmp_path / "rest.jsonl") == []


def test_crash_after_output_before_ack_is_not_exported_twice(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger, range(6))
    with monkeypatch.context() as patch:
        patch.setattr(ledger, "export_commit", _crash)
        with pytest.raises(SimulatedCrash):
            export_usage(ledger, "csv", tmp_path / "1.csv")
    assert len((tmp_path / "1.csv").read_text().splitlines()) == 1 + 6  # delivered, not acked
    more = fill(ledger, range(6, 9))
    result = export_usage(ledger, "jsonl", tmp_path / "2.jsonl")
    assert (result.recovered, result.exported) == (6, 3)
    assert ids_in(tmp_path / "2.jsonl") == [r.request_id for r in more]


def test_crash_between_rename_and_journal_update_uses_the_hash(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger, range(4))
    save = ledger.save_journal

    def crash_when_marking_written(cursor: str, journal: object) -> None:
        if journal is not None and journal.written:  # type: ignore[attr-defined]
            raise SimulatedCrash
        save(cursor, journal)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(ledger, "save_journal", crash_when_marking_written)
        with pytest.raises(SimulatedCrash):
            export_usage(ledger, "jsonl", tmp_path / "1.jsonl")
    result = export_usage(ledger, "jsonl", tmp_path / "2.jsonl")
    assert (result.recovered, result.exported) == (4, 0)


def test_crash_before_output_appears_exports_those_events_next_run(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = fill(ledger, range(5))
    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", _crash)
        with pytest.raises(SimulatedCrash):
            export_usage(ledger, "jsonl", tmp_path / "1.jsonl")
    assert not (tmp_path / "1.jsonl").exists()
    result = export_usage(ledger, "jsonl", tmp_path / "1.jsonl")
    assert (result.recovered, result.exported) == (0, 5)
    assert ids_in(tmp_path / "1.jsonl") == [r.request_id for r in records]


def test_crash_after_reading_survives_a_new_ledger_object(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart of the exporter: events read (Redis: delivered to the group) but never
    acknowledged are exported by the next run, once."""
    with backend.open() as ledger:
        records = fill(ledger, range(5))
        monkeypatch.setattr(ledger, "save_journal", _crash)
        with pytest.raises(SimulatedCrash):
            export_usage(ledger, "jsonl", tmp_path / "1.jsonl")
    with backend.open() as ledger:
        export_usage(ledger, "jsonl", tmp_path / "2.jsonl")
        export_usage(ledger, "jsonl", tmp_path / "3.jsonl")
    assert ids_in(tmp_path / "2.jsonl") == [r.request_id for r in records]
    assert ids_in(tmp_path / "3.jsonl") == []


def test_one_export_per_cursor_at_a_time(ledger: Ledger, tmp_path: Path) -> None:
    assert ledger.export_lock("default", "someone-else", 60)
    with pytest.raises(ExportError, match="another export"):
        export_usage(ledger, "jsonl", tmp_path / "1.jsonl")
    ledger.export_unlock("default", "someone-else")
    export_usage(ledger, "jsonl", tmp_path / "1.jsonl")


def test_refuses_to_overwrite_an_output(ledger: Ledger, tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text("keep me")
    fill(ledger, range(2))
    with pytest.raises(ExportError, match="exists"):
        export_usage(ledger, "csv", tmp_path / "old.csv")
    assert (tmp_path / "old.csv").read_text() == "keep me"
    assert export_usage(ledger, "csv", tmp_path / "new.csv").exported == 2


def test_stdout_export(ledger: Ledger) -> None:
    fill(ledger, range(3))
    out = io.StringIO()
    assert export_usage(ledger, "jsonl", stdout=out).exported == 3
    assert len(out.getvalue().splitlines()) == 3


def test_csv_format(ledger: Ledger, tmp_path: Path) -> None:
    records = fill(ledger, range(4))
    export_usage(ledger, "csv", tmp_path / "u.csv")
    with (tmp_path / "u.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert [UsageRecord.from_dict(row) for row in rows] == records
    assert rows[0]["price"] == format(records[0].price, "f")
    assert rows[0]["finished_at"] == "2026-01-15T10:00:00.000000Z"


def test_jsonl_format(ledger: Ledger, tmp_path: Path) -> None:
    records = fill(ledger, range(3))
    export_usage(ledger, "jsonl", tmp_path / "u.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert [UsageRecord.from_dict(line) for line in lines] == records
    assert isinstance(lines[0]["flops"], int) and isinstance(lines[0]["price"], str)


def test_cloudevents_format(ledger: Ledger, tmp_path: Path) -> None:
    records = fill(ledger, range(3))
    export_usage(ledger, "cloudevents", tmp_path / "u.ce", source="//subjective/eu-1")
    events = [json.loads(line) for line in (tmp_path / "u.ce").read_text().splitlines()]
    for event, record in zip(events, records, strict=True):
        assert event["specversion"] == "1.0"
        assert event["id"] == record.request_id
        assert event["source"] == "//subjective/eu-1"
        assert event["type"] == "subjective.usage"
        assert event["subject"] == record.api_key_id
        assert event["datacontenttype"] == "application/json"
        assert datetime.fromisoformat(event["time"]) == record.finished_at  # RFC 3339
        assert event["time"].endswith("Z")
        assert UsageRecord.from_dict(event["data"]) == record
        assert set(event) == {
            "specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"
        }  # fmt: skip


def test_cli_export(backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend.redis is not None:
        monkeypatch.setenv("REDIS_URL", backend.redis.url)
    else:
        monkeypatch.delenv("REDIS_URL", raising=False)
        monkeypatch.chdir(tmp_path)  # the default path, var/ledger.sqlite3, under cwd
    with cli_ledger(backend) as ledger:
        fill(ledger, range(5))
    parser = argparse.ArgumentParser(prog="subjective")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(["billing", "export", *argv])
        return args.handler(args)

    window = ["--from", "2026-01-15T10:00:01Z", "--to", "2026-01-15T10:00:04"]
    assert run(*window, "--format", "cloudevents", "--output", str(tmp_path / "a.ce")) == 0
    events = [json.loads(line) for line in (tmp_path / "a.ce").read_text().splitlines()]
    assert [e["id"] for e in events] == ["req-000001", "req-000002", "req-000003"]
    assert run("--format", "csv", "--output", str(tmp_path / "b.csv")) == 0
    rows = list(csv.DictReader((tmp_path / "b.csv").open(newline="")))
    assert [row["request_id"] for row in rows] == ["req-000000", "req-000004"]
    assert run("--format", "csv", "--output", str(tmp_path / "b.csv")) == 1  # exists


def cli_ledger(backend: Backend) -> Ledger:
    """The CLI's default ledger (var/ledger.sqlite3 under cwd) for SQLite, else the backend."""
    if backend.redis is None:
        from subjective.server.ledger import open_ledger

        return open_ledger()
    return backend.open()


def _crash(*args: object, **kwargs: object) -> None:
    raise SimulatedCrash
