"""Fault scenarios' verdicts: reconcile what a server accepted with what it recorded, and
collect the figures into `benchmarks/results/faults.json` (`make faults` sets
SUBJECTIVE_FAULTS_REPORT to that path; without it nothing is written).

Every request the server accepted must have exactly one record (`lost`, `duplicated`), and
no record may exist for a request it never accepted (`phantom`). Requests are matched by id
where the client learnt it, by count for the others (a client that left before its answer).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from subjective.server.ledger import Ledger, UsageQuery, UsageRecord, export_usage

REPORT_ENV = "SUBJECTIVE_FAULTS_REPORT"


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: int  # sent
    accepted: int  # admitted by the server (answered, streaming, or left by the client)
    records: int
    lost: int
    duplicated: int
    phantom: int


def reconcile(
    name: str,
    requests: int,
    accepted_ids: set[str],
    records: list[UsageRecord],
    accepted_unnamed: int = 0,
) -> Scenario:
    """`accepted_unnamed`: accepted requests whose id the client never saw."""
    counts = Counter(record.request_id for record in records)
    duplicated = sum(count - 1 for count in counts.values())
    unmatched = len(set(counts) - accepted_ids)  # records of no known request
    lost = len(accepted_ids - set(counts)) + max(0, accepted_unnamed - unmatched)
    phantom = max(0, unmatched - accepted_unnamed)
    return Scenario(
        name=name,
        requests=requests,
        accepted=len(accepted_ids) + accepted_unnamed,
        records=len(records),
        lost=lost,
        duplicated=duplicated,
        phantom=phantom,
    )


def key_records(ledger: Ledger, api_key_id: str) -> list[UsageRecord]:
    return ledger.usage(UsageQuery(api_key_id=api_key_id, limit=100_000))


def exported_ids(ledger: Ledger, api_key_id: str, cursor: str) -> list[str]:
    """Request ids of the key's events a fresh export cursor writes (JSONL)."""
    import io

    out = io.StringIO()
    export_usage(ledger, "jsonl", cursor=cursor, stdout=out)
    rows = (json.loads(line) for line in out.getvalue().splitlines())
    return [row["request_id"] for row in rows if row["api_key_id"] == api_key_id]


def assert_clean(scenario: Scenario) -> None:
    """The verdict; the figures go to the report first, whatever it is."""
    record_scenario(scenario)
    assert (scenario.lost, scenario.duplicated, scenario.phantom) == (0, 0, 0), scenario


def _update(change: dict[str, Any]) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    report_path = Path(path)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.setdefault("command", shlex.join(["python", "-m", "pytest", *sys.argv[1:]]))
    report.setdefault("scenarios", [])
    for name, value in change.items():
        if name == "scenario":
            report["scenarios"] = [s for s in report["scenarios"] if s["name"] != value["name"]]
            report["scenarios"].append(value)
        else:
            report[name] = value
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")


def record_scenario(scenario: Scenario) -> None:
    _update({"scenario": asdict(scenario)})


def record_fuzz(cases: int, server_errors: int) -> None:
    _update({"fuzz": {"cases": cases, "server_errors": server_errors}})


def record_budget_overshoot(ratio: float) -> None:
    _update({"budget_overshoot_ratio": ratio})


def record_health_latency(p99_s: float) -> None:
    """`/health`'s p99 while 20 MiB bodies are being refused."""
    _update({"health_p99_ms_during_20mib_body": round(p99_s * 1000, 2)})
