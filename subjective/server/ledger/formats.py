"""Billing export formats: CSV, JSON Lines, and CloudEvents 1.0 (structured JSON, one per line)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any, TextIO

from subjective.server.ledger.record import UsageRecord, iso

FORMATS = ("csv", "jsonl", "cloudevents")
CSV_COLUMNS = (*(f.name for f in fields(UsageRecord)), "price")
EVENT_TYPE = "subjective.usage"
DEFAULT_SOURCE = "subjective"


def cloudevent(usage: UsageRecord, source: str = DEFAULT_SOURCE) -> dict[str, Any]:
    """The event usage-metering services (e.g. OpenMeter) ingest: id is the request id, so
    `source` + `id` is unique and a re-sent event is recognised as a duplicate."""
    return {
        "specversion": "1.0",
        "id": usage.request_id,
        "source": source,
        "type": EVENT_TYPE,
        "subject": usage.api_key_id,
        "time": iso(usage.finished_at),
        "datacontenttype": "application/json",
        "data": usage.to_dict(),
    }


def write_csv(records: Iterable[UsageRecord], out: TextIO, source: str = DEFAULT_SOURCE) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for usage in records:
        writer.writerow(usage.to_dict())


def write_jsonl(records: Iterable[UsageRecord], out: TextIO, source: str = DEFAULT_SOURCE) -> None:
    for usage in records:
        out.write(json.dumps(usage.to_dict()) + "\n")


def write_cloudevents(
    records: Iterable[UsageRecord], out: TextIO, source: str = DEFAULT_SOURCE
) -> None:
    for usage in records:
        out.write(json.dumps(cloudevent(usage, source)) + "\n")


WRITERS: dict[str, Callable[[Iterable[UsageRecord], TextIO, str], None]] = {
    "csv": write_csv,
    "jsonl": write_jsonl,
    "cloudevents": write_cloudevents,
}
