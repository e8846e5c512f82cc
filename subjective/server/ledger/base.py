"""The ledger interface every backend implements, and the values it passes around."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from subjective.server.ledger.record import UsageRecord


class LedgerUnavailable(Exception):
    """The store cannot be reached right now (refused, timed out, locked): spool and retry."""


class WriteResult(StrEnum):
    RECORDED = "recorded"  # stored now
    DUPLICATE = "duplicate"  # this request id was already stored: nothing counted twice
    SPOOLED = "spooled"  # store unreachable: kept on local disk, replayed later


@dataclass(frozen=True)
class UsageQuery:
    """Filters on stored usage; the time range is on `finished_at`, `since` <= t < `until`."""

    api_key_id: str | None = None  # None: all keys (admin only; the server enforces that)
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000
    descending: bool = False  # newest first; ties broken by request id either way


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flops: int = 0
    dense_flops: int = 0
    price_nanos: int = 0

    @property
    def price(self) -> Decimal:
        return Decimal(self.price_nanos).scaleb(-9)

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @classmethod
    def of(cls, records: Iterable[UsageRecord]) -> Totals:
        total = cls()
        for r in records:
            total += cls(
                1, r.prompt_tokens, r.completion_tokens, r.flops, r.dense_flops, r.price_nanos
            )
        return total


@dataclass(frozen=True)
class Reservation:
    """FLOPs a request may still execute, held against its key's budget while it runs.

    Admitted while the key's spend in `[since, until)` plus its outstanding reservations is
    under `budget`; so concurrent requests overshoot a budget by at most one reservation.
    A reservation its server never releases (a crash) lapses at `expires_at`."""

    request_id: str
    api_key_id: str
    flops: int
    budget: int
    since: datetime
    until: datetime
    expires_at: datetime


@dataclass(frozen=True)
class ExportEvent:
    """One usage event in the ledger's log; `event_id` orders the log (stream id, row seq)."""

    event_id: str
    record: UsageRecord


@dataclass(frozen=True)
class ExportJournal:
    """An export run's intent, saved before its output appears: see `export.py`."""

    event_ids: tuple[str, ...]
    output: str
    sha256: str
    written: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportJournal:
        data = json.loads(text)
        return cls(tuple(data["event_ids"]), data["output"], data["sha256"], data["written"])


class Ledger(ABC):
    """Usage storage. Writes are idempotent by request id; reads see committed writes."""

    @abstractmethod
    def record(self, usage: UsageRecord) -> WriteResult:
        """Store once: RECORDED, or DUPLICATE when the request id is known (retries are safe).

        Raises LedgerUnavailable when the store cannot be reached.
        """

    @abstractmethod
    def usage(self, query: UsageQuery) -> list[UsageRecord]:
        """Stored records matching `query`, ordered by (finished_at, request_id)."""

    @abstractmethod
    def totals(
        self,
        api_key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Totals:
        """Exact sums over records with since <= finished_at < until (None: unbounded)."""

    @abstractmethod
    def reserve(self, reservation: Reservation) -> int | None:
        """Atomically: if the key's spend in the window plus its outstanding reservations is
        under the budget, hold `reservation.flops` and return None; else hold nothing and
        return that committed sum. Reserving a request id twice holds it once."""

    @abstractmethod
    def release(self, api_key_id: str, request_id: str) -> None:
        """Drop a request's reservation (its record now counts instead); unknown: no-op."""

    @abstractmethod
    def ping(self) -> None:
        """Raise LedgerUnavailable unless the store answers."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # Export log: the primitives `export.py` builds exactly-once export on.

    @abstractmethod
    def export_events(self, cursor: str, batch: int = 500) -> Iterator[ExportEvent]:
        """Every event not yet committed for `cursor`, in log order; a new cursor sees all."""

    @abstractmethod
    def export_commit(self, cursor: str, event_ids: Sequence[str]) -> None:
        """Mark events exported for `cursor`; committing twice is harmless."""

    @abstractmethod
    def export_lock(self, cursor: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the cursor's lock for `owner`; False while another owner holds it."""

    @abstractmethod
    def export_unlock(self, cursor: str, owner: str) -> None:
        """Release the lock if `owner` holds it."""

    @abstractmethod
    def load_journal(self, cursor: str) -> ExportJournal | None: ...

    @abstractmethod
    def save_journal(self, cursor: str, journal: ExportJournal | None) -> None:
        """Store (or with None, clear) the cursor's journal, durably."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
