"""Redis ledger: shared by every replica. One Lua script per write keeps it idempotent.

Keys (all under one hash tag, so a Redis Cluster keeps them in one slot):
  P:req:<request id>            hash, the record; its existence is the idempotency guard
  P:events                      stream of usage events; export reads it via consumer groups
  P:idx:all, P:idx:key:<key>    sorted sets of request ids scored by finished_at (us)
  P:total:all, P:total:key:<k>  all-time aggregates (hash of counters)
  P:hourly:<hour>:all|key:<k>   the same per UTC hour of finished_at, for period totals
  P:reservations:key:<k>        sorted set of the key's held request ids, by expiry (us)
  P:reserved:key:<k>            hash, request id -> FLOPs held (see `Reservation`)
  P:journal:<cursor>            an export run's journal
  P:lock:<cursor>               one export at a time per cursor
FLOP sums may pass 2^63 (HINCRBY's range), so they are kept as a giga part and a remainder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

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
from subjective.server.ledger.record import UsageRecord, to_micros

HOUR_US = 3_600 * 1_000_000
GIGA = 1_000_000_000
EXPORT_CONSUMER = "exporter"  # one consumer per group: the cursor's pending list is its own
AGGREGATE_FIELDS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "flops_g",
    "flops_r",
    "dense_g",
    "dense_r",
    "price_nanos",
)
WRITE_SCRIPT = """#!lua
-- The shebang (Redis 7+) makes Redis refuse the whole script up front when out of memory,
-- never halfway through its writes.
-- Record one usage event at most once, atomically (see redis_backend.py for the key layout).
-- KEYS[1] record hash (the idempotency guard), KEYS[2] event stream, KEYS[3] index of all
-- records, KEYS[4] index of the key's records, KEYS[5..] aggregate hashes to increment.
-- ARGV[1] request id, ARGV[2] finished_at (us, the index score), ARGV[3] n, then n
-- aggregate field/increment pairs, then the record's field/value pairs.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local n = tonumber(ARGV[3])
local first_field = 4 + 2 * n
local record = {}
for i = first_field, #ARGV do
  record[#record + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(record))
redis.call('XADD', KEYS[2], '*', unpack(record))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
for k = 5, #KEYS do
  for i = 4, first_field - 1, 2 do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

RESERVE_SCRIPT = """
-- Hold a request's worst-case FLOPs against its key's budget, atomically (see Reservation).
-- KEYS[1] the key's reservations (sorted set: request id -> expiry, us), KEYS[2] their
-- amounts (hash), KEYS[3..] the key's hourly aggregates over the budget window.
-- ARGV[1] now (us), ARGV[2] request id, ARGV[3] FLOPs, ARGV[4] budget, ARGV[5] expiry (us).
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local committed = 0
local amounts = redis.call('HGETALL', KEYS[2])
for i = 1, #amounts, 2 do
  if amounts[i] ~= ARGV[2] then committed = committed + tonumber(amounts[i + 1]) end
end
for k = 3, #KEYS do
  local parts = redis.call('HMGET', KEYS[k], 'flops_g', 'flops_r')
  committed = committed + (tonumber(parts[1]) or 0) * 1e9 + (tonumber(parts[2]) or 0)
end
if committed >= tonumber(ARGV[4]) then
  return string.format('%.0f', committed)
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[2])
return false
"""

LOCK_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

P = ParamSpec("P")
T = TypeVar("T")


# Replies that mean "not now" (full, read-only replica after a failover, persistence
# failing, no primary): the write may succeed later, so spool rather than fail.
TRANSIENT_ERRORS = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)
TRANSIENT_PREFIXES = ("MISCONF", "NOREPLICAS")


def _unavailable_on_network_errors(method: Callable[P, T]) -> Callable[P, T]:
    @wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as error:  # includes LOADING
            raise LedgerUnavailable(f"redis ledger: {error}") from error
        except ResponseError as error:
            if isinstance(error, TRANSIENT_ERRORS) or str(error).startswith(TRANSIENT_PREFIXES):
                raise LedgerUnavailable(f"redis ledger: {error}") from error
            raise

    return wrapper


class RedisLedger(Ledger):
    def __init__(
        self,
        url: str,
        prefix: str = "subjective",
        socket_timeout_s: float = 2.0,
        retries: int = 2,
    ) -> None:
        # A short, bounded retry reconnects a pooled connection after a Redis restart; past
        # that the caller spools instead of holding a request up.
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            protocol=2,  # the reply shapes parsed below (redis-py 8 defaults to RESP3)
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries),
        )
        self._p = "{" + prefix + "}"
        self._write = self._redis.register_script(WRITE_SCRIPT)
        self._lock = self._redis.register_script(LOCK_SCRIPT)
        self._reserve = self._redis.register_script(RESERVE_SCRIPT)
        self._unlock = self._redis.register_script(UNLOCK_SCRIPT)
        self._groups: set[str] = set()

    # Writes

    @_unavailable_on_network_errors
    def record(self, usage: UsageRecord) -> WriteResult:
        key, hour = usage.api_key_id, usage.finished_us // HOUR_US
        keys = [
            f"{self._p}:req:{usage.request_id}",
            self._stream,
            self._index(None),
            self._index(key),
            self._total(None),
            self._total(key),
            self._hourly(hour, None),
            self._hourly(hour, key),
        ]
        increments = _aggregate_increments(usage)
        args: list[Any] = [usage.request_id, usage.finished_us, len(increments)]
        for name, value in increments.items():
            args += [name, value]
        for name, value in usage.to_fields().items():
            args += [name, value]
        stored = self._write(keys=keys, args=args)
        return WriteResult.RECORDED if stored == 1 else WriteResult.DUPLICATE

    @_unavailable_on_network_errors
    def reserve(self, reservation: Reservation) -> int | None:
        r = reservation
        hours = range(to_micros(r.since) // HOUR_US, -(-to_micros(r.until) // HOUR_US))
        keys = [
            self._reservations(r.api_key_id),
            self._reserved(r.api_key_id),
            *(self._hourly(hour, r.api_key_id) for hour in hours),
        ]
        args = [
            to_micros(datetime.now(UTC)),
            r.request_id,
            r.flops,
            r.budget,
            to_micros(r.expires_at),
        ]
        committed = self._reserve(keys=keys, args=args)
        return None if committed is None else int(committed)

    @_unavailable_on_network_errors
    def release(self, api_key_id: str, request_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(self._reservations(api_key_id), request_id)
        pipe.hdel(self._reserved(api_key_id), request_id)
        pipe.execute()

    # Reads

    @_unavailable_on_network_errors
    def usage(self, query: UsageQuery) -> list[UsageRecord]:
        low = "-inf" if query.since is None else to_micros(query.since)
        high = "+inf" if query.until is None else f"({to_micros(query.until)}"
        index, page, offset = self._index(query.api_key_id), max(query.limit, 100), 0
        found: list[UsageRecord] = []
        while len(found) < query.limit:
            if query.descending:
                ids = self._redis.zrevrangebyscore(index, high, low, start=offset, num=page)
            else:
                ids = self._redis.zrangebyscore(index, low, high, start=offset, num=page)
            if not ids:
                break
            offset += len(ids)
            for record in self._records(ids):
                if query.model is None or record.model == query.model:
                    found.append(record)
        return found[: query.limit]

    @_unavailable_on_network_errors
    def totals(
        self,
        api_key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Totals:
        """Whole UTC hours come from hourly aggregates; only partial edge hours are scanned."""
        if since is None and until is None:
            return _totals_of(self._redis.hgetall(self._total(api_key_id)))
        index = self._index(api_key_id)
        if since is None:
            first = self._redis.zrange(index, 0, 0, withscores=True)
            if not first:
                return Totals()
            low, first_hour = int(first[0][1]), int(first[0][1]) // HOUR_US
        else:
            low = to_micros(since)
            first_hour = -(-low // HOUR_US)  # first hour starting at or after `low`
        if until is None:
            last = self._redis.zrange(index, -1, -1, withscores=True)
            if not last:
                return Totals()
            high, end_hour = int(last[0][1]) + 1, int(last[0][1]) // HOUR_US + 1
        else:
            high = to_micros(until)
            end_hour = high // HOUR_US  # hours before this one end at or before `high`
        if first_hour >= end_hour:
            return self._scan(index, low, high)
        pipe = self._redis.pipeline(transaction=False)
        for hour in range(first_hour, end_hour):
            pipe.hgetall(self._hourly(hour, api_key_id))
        total = Totals()
        for counters in pipe.execute():
            total += _totals_of(counters)
        return (
            total
            + self._scan(index, low, min(high, first_hour * HOUR_US))
            + self._scan(index, max(low, end_hour * HOUR_US), high)
        )

    @_unavailable_on_network_errors
    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        self._redis.close()

    # Export log: one consumer group per cursor over the event stream.

    def export_events(self, cursor: str, batch: int = 500) -> Iterator[ExportEvent]:
        """First what this cursor read before and never acknowledged, then new events."""
        self._ensure_group(cursor)
        last = "0"
        while entries := self._read_group(cursor, last, batch):
            for event_id, fields in entries:
                if fields:  # an entry trimmed from the stream comes back empty
                    yield ExportEvent(event_id, UsageRecord.from_dict(fields))
            last = entries[-1][0]
        while entries := self._read_group(cursor, ">", batch):
            for event_id, fields in entries:
                yield ExportEvent(event_id, UsageRecord.from_dict(fields))

    @_unavailable_on_network_errors
    def export_commit(self, cursor: str, event_ids: Sequence[str]) -> None:
        for start in range(0, len(event_ids), 1000):
            self._redis.xack(self._stream, cursor, *event_ids[start : start + 1000])

    @_unavailable_on_network_errors
    def export_lock(self, cursor: str, owner: str, ttl_s: float) -> bool:
        key = f"{self._p}:lock:{cursor}"
        return self._lock(keys=[key], args=[owner, int(ttl_s * 1000)]) == 1

    @_unavailable_on_network_errors
    def export_unlock(self, cursor: str, owner: str) -> None:
        self._unlock(keys=[f"{self._p}:lock:{cursor}"], args=[owner])

    @_unavailable_on_network_errors
    def load_journal(self, cursor: str) -> ExportJournal | None:
        text = self._redis.get(f"{self._p}:journal:{cursor}")
        return None if text is None else ExportJournal.from_json(text)

    @_unavailable_on_network_errors
    def save_journal(self, cursor: str, journal: ExportJournal | None) -> None:
        key = f"{self._p}:journal:{cursor}"
        if journal is None:
            self._redis.delete(key)
        else:
            self._redis.set(key, journal.to_json())

    # Helpers

    @property
    def _stream(self) -> str:
        return f"{self._p}:events"

    def _index(self, api_key_id: str | None) -> str:
        return f"{self._p}:idx:" + ("all" if api_key_id is None else f"key:{api_key_id}")

    def _total(self, api_key_id: str | None) -> str:
        return f"{self._p}:total:" + ("all" if api_key_id is None else f"key:{api_key_id}")

    def _reservations(self, api_key_id: str) -> str:
        return f"{self._p}:reservations:key:{api_key_id}"

    def _reserved(self, api_key_id: str) -> str:
        return f"{self._p}:reserved:key:{api_key_id}"

    def _hourly(self, hour: int, api_key_id: str | None) -> str:
        scope = "all" if api_key_id is None else f"key:{api_key_id}"
        return f"{self._p}:hourly:{hour}:{scope}"

    def _records(self, request_ids: Sequence[str]) -> list[UsageRecord]:
        pipe = self._redis.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hgetall(f"{self._p}:req:{request_id}")
        return [UsageRecord.from_dict(fields) for fields in pipe.execute()]

    def _scan(self, index: str, low: int, high: int) -> Totals:
        """Exact totals of records with low <= finished_us < high, read record by record."""
        if low >= high:
            return Totals()
        ids = self._redis.zrangebyscore(index, low, f"({high}")
        return Totals.of(self._records(ids)) if ids else Totals()

    @_unavailable_on_network_errors
    def _ensure_group(self, cursor: str) -> None:
        if cursor in self._groups:
            return
        try:  # from id 0: a new cursor exports the whole history
            self._redis.xgroup_create(self._stream, cursor, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._groups.add(cursor)

    @_unavailable_on_network_errors
    def _read_group(self, cursor: str, start: str, count: int) -> list[tuple[str, dict]]:
        reply = self._redis.xreadgroup(cursor, EXPORT_CONSUMER, {self._stream: start}, count)
        return reply[0][1] if reply else []


def _aggregate_increments(usage: UsageRecord) -> dict[str, int]:
    flops_g, flops_r = divmod(usage.flops, GIGA)
    dense_g, dense_r = divmod(usage.dense_flops, GIGA)
    return {
        "requests": 1,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "flops_g": flops_g,
        "flops_r": flops_r,
        "dense_g": dense_g,
        "dense_r": dense_r,
        "price_nanos": usage.price_nanos,
    }


def _totals_of(counters: dict[str, str]) -> Totals:
    c = {name: int(counters.get(name, 0)) for name in AGGREGATE_FIELDS}
    return Totals(
        c["requests"],
        c["prompt_tokens"],
        c["completion_tokens"],
        c["flops_g"] * GIGA + c["flops_r"],
        c["dense_g"] * GIGA + c["dense_r"],
        c["price_nanos"],
    )
