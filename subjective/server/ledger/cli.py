"""`subjective billing export`: usage events to CSV, JSON Lines or CloudEvents, once each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from subjective.server.ledger.base import LedgerUnavailable
from subjective.server.ledger.export import DEFAULT_CURSOR, ExportError, export_usage
from subjective.server.ledger.factory import open_ledger
from subjective.server.ledger.formats import DEFAULT_SOURCE, FORMATS
from subjective.server.ledger.record import parse_iso


def register(subparsers: argparse._SubParsersAction) -> None:
    billing = subparsers.add_parser("billing", help="billing: export recorded usage")
    commands = billing.add_subparsers(dest="billing_command", required=True)
    export = commands.add_parser(
        "export",
        help="export usage not yet exported through this cursor",
        description="Each event goes out once per cursor, across runs and crashes. Ledger: "
        "Redis at REDIS_URL, else SQLite at SUBJECTIVE_LEDGER_PATH (var/ledger.sqlite3).",
    )
    export.add_argument("--from", dest="since", type=parse_iso, help="finished_at >= (ISO 8601)")
    export.add_argument("--to", dest="until", type=parse_iso, help="finished_at < (ISO 8601)")
    export.add_argument("--format", choices=FORMATS, default="jsonl")
    export.add_argument("--output", type=Path, help="new file to write (default: stdout)")
    export.add_argument("--cursor", default=DEFAULT_CURSOR, help="named export position")
    export.add_argument("--source", default=DEFAULT_SOURCE, help="CloudEvents `source`")
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    with open_ledger() as ledger:
        try:
            result = export_usage(
                ledger,
                args.format,
                output=args.output,
                since=args.since,
                until=args.until,
                cursor=args.cursor,
                source=args.source,
            )
        except (ExportError, LedgerUnavailable) as error:
            print(f"billing export: {error}", file=sys.stderr)
            return 1
    where = result.output or "stdout"
    note = f" (+{result.recovered} from an interrupted run)" if result.recovered else ""
    print(f"exported {result.exported} usage events to {where}{note}", file=sys.stderr)
    return 0
