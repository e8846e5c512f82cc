"""Usage ledger (Redis or SQLite), durable spool, and billing export."""

from subjective.server.ledger.base import (
    ExportEvent,
    ExportJournal,
    Ledger,
    LedgerUnavailable,
    Reservation,
    Totals,
    UsageQuery,
    WriteResult,
)
from subjective.server.ledger.export import ExportError, ExportResult, export_usage
from subjective.server.ledger.factory import open_ledger, open_server_ledger
from subjective.server.ledger.pricing import Pricing
from subjective.server.ledger.record import Status, UsageRecord
from subjective.server.ledger.spool import Spool
from subjective.server.ledger.spooling import SpoolingLedger

__all__ = [
    "ExportError",
    "ExportEvent",
    "ExportJournal",
    "ExportResult",
    "Ledger",
    "LedgerUnavailable",
    "Pricing",
    "Reservation",
    "Spool",
    "SpoolingLedger",
    "Status",
    "Totals",
    "UsageQuery",
    "UsageRecord",
    "WriteResult",
    "export_usage",
    "open_ledger",
    "open_server_ledger",
]
