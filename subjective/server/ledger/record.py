"""The usage record: what one request executed and what it costs, as the ledger stores it.

One canonical flat form (`to_dict`/`from_dict`) serves every store: Redis hashes and stream
entries, the spool, JSONL and CloudEvents export. Prices are integer nano-units of the
currency (`price_nanos`), so sums are exact; `price` is the same amount as a `Decimal`.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

NANOS_PER_UNIT = 1_000_000_000
INT64_MAX = 2**63 - 1


class Status(StrEnum):
    """How a request ended; cancelled and failed requests still pay for the work done."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"
    INTERRUPTED = "interrupted"  # its server died mid-request; closed on the next start


def utc(moment: datetime) -> datetime:
    """The same instant in UTC; naive datetimes are refused, since their zone is a guess."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: give a timezone")
    return moment.astimezone(UTC)


def to_micros(moment: datetime) -> int:
    """Microseconds since the epoch: exact, sortable, and exact as a Redis sorted-set score."""
    delta = utc(moment) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a `Z`, as CloudEvents and CSV carry it."""
    return utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    """An ISO 8601 instant; without an offset it is taken as UTC (the CLI's convenience)."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    api_key_id: str
    model: str
    quality: str
    threshold: float | None
    prompt_tokens: int
    completion_tokens: int
    flops: int
    dense_flops: int
    kv_entries: int
    kv_entries_dense: int
    price_nanos: int
    started_at: datetime
    finished_at: datetime
    status: Status = Status.COMPLETED
    state_bytes: int = 0  # hybrids: the linear layers' recurrent state (records before: 0)

    def __post_init__(self) -> None:
        for name in ("request_id", "api_key_id", "model"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in _COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if not 0 <= value <= INT64_MAX:
                raise ValueError(f"{name} out of range: {value}")
        object.__setattr__(self, "started_at", utc(self.started_at))
        object.__setattr__(self, "finished_at", utc(self.finished_at))
        object.__setattr__(self, "status", Status(self.status))
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")

    @property
    def price(self) -> Decimal:
        return Decimal(self.price_nanos).scaleb(-9)

    @property
    def finished_us(self) -> int:
        return to_micros(self.finished_at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ints stay ints, times are RFC 3339, `price` is a decimal string."""
        data = asdict(self)
        data["started_at"] = iso(self.started_at)
        data["finished_at"] = iso(self.finished_at)
        data["status"] = self.status.value
        data["price"] = format(self.price, "f")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        """Inverse of `to_dict`; also accepts the all-strings form of Redis hashes."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name not in data and field.default is not MISSING:
                continue  # a record written before the field existed
            raw = data[field.name]
            if field.name in _COUNTS:
                values[field.name] = int(raw)
            elif field.name == "threshold":
                values[field.name] = None if raw in (None, "") else float(raw)
            elif field.name in ("started_at", "finished_at"):
                values[field.name] = parse_iso(raw)
            else:
                values[field.name] = str(raw)
        return cls(**values)

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for Redis (hash and stream entry); None becomes ''."""
        return {k: "" if v is None else str(v) for k, v in self.to_dict().items()}


_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "flops",
    "dense_flops",
    "kv_entries",
    "kv_entries_dense",
    "state_bytes",
    "price_nanos",
)
