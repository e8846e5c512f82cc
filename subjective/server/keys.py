"""API keys: created with a secret shown once, stored hashed, verified in constant time.

A secret reads `sk-subj-<key id>.<random>`: the id finds the stored hash without comparing
secrets, and the hashes are compared with `hmac.compare_digest`. The random part has 256
bits, so a plain SHA-256 is enough at rest (no slow hash needed, none of it stored in clear).
Keys live in SQLite (SUBJECTIVE_KEYS_PATH, default var/keys.sqlite3), or in Redis when
REDIS_URL is set, so that every replica sees the same keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from subjective.server.ledger.sqlite_connect import connect

SECRET_PREFIX = "sk-subj-"
DEFAULT_KEYS_PATH = Path("var/keys.sqlite3")
# An adopted secret's random part: at least what 192 bits take in URL-safe base64.
MIN_RANDOM_CHARS = 32
BudgetPeriod = Literal["hour", "day", "month"]
BUDGET_PERIODS: tuple[BudgetPeriod, ...] = ("hour", "day", "month")
# Compared against when a secret names no stored key, so a miss costs what a hit costs.
_DUMMY_HASH = hashlib.sha256(b"no such key").digest()
T = TypeVar("T")


class KeyStoreUnavailable(Exception):
    """The key store cannot be reached: answer 503, not 401."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    admin: bool = False
    rpm: int | None = None  # requests per minute; None: unlimited
    flops_budget: int | None = None  # executed FLOPs per budget period; None: unlimited
    budget_period: BudgetPeriod = "day"
    created_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def budget_window(self, now: datetime | None = None) -> tuple[datetime, datetime]:
        """The current budget period in UTC calendar terms: [start, end)."""
        now = (now or datetime.now(UTC)).astimezone(UTC)
        if self.budget_period == "hour":
            start = now.replace(minute=0, second=0, microsecond=0)
            return start, start + timedelta(hours=1)
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.budget_period == "day":
            return start, start + timedelta(days=1)
        start = start.replace(day=1)
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        return start, end


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once; only its hash is stored


class KeyStorage(Protocol):
    """Rows of keys with their secret hashes; the store below holds the logic."""

    def insert(self, key: ApiKey, secret_hash: bytes) -> None: ...

    def get(self, key_id: str) -> tuple[ApiKey, bytes] | None: ...

    def all(self) -> list[ApiKey]: ...

    def set_revoked(self, key_id: str, at: datetime) -> bool: ...

    def close(self) -> None: ...


class KeyStore:
    def __init__(self, storage: KeyStorage) -> None:
        self.storage = storage

    def create(
        self,
        name: str,
        admin: bool = False,
        rpm: int | None = None,
        flops_budget: int | None = None,
        budget_period: BudgetPeriod = "day",
    ) -> CreatedKey:
        if budget_period not in BUDGET_PERIODS:
            raise ValueError(f"budget_period must be one of {BUDGET_PERIODS}")
        for label, limit in (("rpm", rpm), ("flops_budget", flops_budget)):
            if limit is not None and limit < 0:
                raise ValueError(f"{label} must not be negative")
        key = ApiKey(
            id=_new_key_id(),
            name=name,
            admin=admin,
            rpm=rpm,
            flops_budget=flops_budget,
            budget_period=budget_period,
            created_at=datetime.now(UTC),
        )
        secret = new_secret(key.id)
        self.storage.insert(key, _hash(secret))
        return CreatedKey(key, secret)

    def adopt(self, secret: str, name: str, admin: bool = False) -> ApiKey | None:
        """Store a key for a secret made elsewhere (`new_secret`: the bootstrap admin key
        from a secret file), hashed like the others. The id is the one the secret names;
        None if that id is already stored, so a revoked one stays revoked."""
        key_id = _key_id(secret)
        if key_id is None or len(secret.partition(".")[2]) < MIN_RANDOM_CHARS:
            raise ValueError(
                f"not a key secret: expected {SECRET_PREFIX}<key id>.<{MIN_RANDOM_CHARS}+ random"
                " characters> (`subjective keys new-secret` makes one)"
            )
        if self.storage.get(key_id) is not None:
            return None
        key = ApiKey(id=key_id, name=name, admin=admin, created_at=datetime.now(UTC))
        self.storage.insert(key, _hash(secret))
        return key

    def verify(self, secret: str) -> ApiKey | None:
        """The active key this secret belongs to, else None (unknown, malformed, revoked)."""
        key_id = _key_id(secret)
        found = self.storage.get(key_id) if key_id else None
        stored_hash = found[1] if found else _DUMMY_HASH
        matches = hmac.compare_digest(_hash(secret), stored_hash)
        if found is None or not matches or not found[0].active:
            return None
        return found[0]

    def get(self, key_id: str) -> ApiKey | None:
        found = self.storage.get(key_id)
        return found[0] if found else None

    def list(self) -> list[ApiKey]:
        return sorted(self.storage.all(), key=lambda key: (key.created_at, key.id))

    def revoke(self, key_id: str) -> bool:
        """True if the key existed and was active; revoked keys stop verifying at once."""
        return self.storage.set_revoked(key_id, datetime.now(UTC))

    def close(self) -> None:
        self.storage.close()


def new_secret(key_id: str | None = None) -> str:
    """A fresh secret for `key_id` (default: a new random id); nothing is stored."""
    return f"{SECRET_PREFIX}{key_id or _new_key_id()}.{secrets.token_urlsafe(32)}"


def _new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _key_id(secret: str) -> str | None:
    if not secret.startswith(SECRET_PREFIX):
        return None
    key_id, dot, rest = secret[len(SECRET_PREFIX) :].partition(".")
    return key_id if dot and key_id and rest else None


# Row form shared by both storages: strings only (None as "").


def _to_row(key: ApiKey) -> dict[str, str]:
    row = asdict(key)
    row["admin"] = "1" if key.admin else "0"
    row["created_at"] = key.created_at.isoformat()
    row["revoked_at"] = key.revoked_at.isoformat() if key.revoked_at else ""
    return {name: "" if value is None else str(value) for name, value in row.items()}


def _from_row(row: Mapping[str, Any]) -> ApiKey:
    def optional(name: str, parse: Callable[[str], T]) -> T | None:
        value = row[name]
        return None if value in (None, "") else parse(str(value))

    return ApiKey(
        id=str(row["id"]),
        name=str(row["name"]),
        admin=str(row["admin"]) == "1",
        rpm=optional("rpm", int),
        flops_budget=optional("flops_budget", int),
        budget_period=row["budget_period"],
        created_at=datetime.fromisoformat(str(row["created_at"])),
        revoked_at=optional("revoked_at", datetime.fromisoformat),
    )


COLUMNS = tuple(_to_row(ApiKey("", "")))


KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    admin TEXT NOT NULL,
    rpm TEXT NOT NULL,
    flops_budget TEXT NOT NULL,
    budget_period TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    secret_hash BLOB NOT NULL  -- SHA-256 of the secret; the secret itself is never stored
);
"""


class SQLiteKeyStorage:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = connect(self.path, KEYS_SCHEMA)
        except sqlite3.OperationalError as error:
            raise KeyStoreUnavailable(f"key store {self.path}: {error}") from error
        self._db.row_factory = sqlite3.Row

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as error:
                raise KeyStoreUnavailable(f"key store {self.path}: {error}") from error

    def insert(self, key: ApiKey, secret_hash: bytes) -> None:
        row = _to_row(key)
        with self._guard():
            self._db.execute(
                f"INSERT INTO api_keys ({', '.join(COLUMNS)}, secret_hash)"
                f" VALUES ({', '.join('?' * (len(COLUMNS) + 1))})",
                [*(row[c] for c in COLUMNS), secret_hash],
            )

    def get(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        with self._guard():
            row = self._db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else (_from_row(row), bytes(row["secret_hash"]))

    def all(self) -> list[ApiKey]:
        with self._guard():
            return [_from_row(row) for row in self._db.execute("SELECT * FROM api_keys")]

    def set_revoked(self, key_id: str, at: datetime) -> bool:
        with self._guard():
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at = ''",
                (at.isoformat(), key_id),
            )
        return cursor.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisKeyStorage:
    """One hash per key under `{prefix}:apikey:<id>`, plus the set of ids."""

    def __init__(self, url: str, prefix: str = "subjective") -> None:
        import redis

        self._redis = redis.Redis.from_url(
            url, decode_responses=True, protocol=2, socket_timeout=2, socket_connect_timeout=2
        )
        self._p = "{" + prefix + "}"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            yield
        except (ConnectionError, TimeoutError) as error:
            raise KeyStoreUnavailable(f"key store: {error}") from error

    def _key(self, key_id: str) -> str:
        return f"{self._p}:apikey:{key_id}"

    def insert(self, key: ApiKey, secret_hash: bytes) -> None:
        with self._guard():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._key(key.id), mapping={**_to_row(key), "secret_hash": secret_hash.hex()})
            pipe.sadd(f"{self._p}:apikeys", key.id)
            pipe.execute()

    def get(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        with self._guard():
            row = self._redis.hgetall(self._key(key_id))
        return (_from_row(row), bytes.fromhex(row["secret_hash"])) if row else None

    def all(self) -> list[ApiKey]:
        with self._guard():
            ids = self._redis.smembers(f"{self._p}:apikeys")
            pipe = self._redis.pipeline(transaction=False)
            for key_id in ids:
                pipe.hgetall(self._key(key_id))
            return [_from_row(row) for row in pipe.execute() if row]

    def set_revoked(self, key_id: str, at: datetime) -> bool:
        found = self.get(key_id)
        if found is None or not found[0].active:
            return False
        with self._guard():
            self._redis.hset(self._key(key_id), "revoked_at", at.isoformat())
        return True

    def close(self) -> None:
        self._redis.close()


def open_key_store(env: Mapping[str, str] | None = None) -> KeyStore:
    """Redis at REDIS_URL, else SQLite at SUBJECTIVE_KEYS_PATH (default var/keys.sqlite3)."""
    env = os.environ if env is None else env
    if url := env.get("REDIS_URL"):
        return KeyStore(RedisKeyStorage(url))
    return KeyStore(SQLiteKeyStorage(env.get("SUBJECTIVE_KEYS_PATH") or DEFAULT_KEYS_PATH))


__all__ = [
    "ApiKey",
    "CreatedKey",
    "KeyStore",
    "KeyStoreUnavailable",
    "RedisKeyStorage",
    "SQLiteKeyStorage",
    "new_secret",
    "open_key_store",
]
