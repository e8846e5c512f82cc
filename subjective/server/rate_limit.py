"""Requests per minute per key: a sliding one-minute window of admitted requests.

In one process the window lives in memory. Replicas sharing Redis (REDIS_URL) share it
there, so a key's limit holds across every replica: one sorted set per key, trimmed,
counted and extended by one Lua script, atomically.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Protocol

from subjective.server.keys import ApiKey

WINDOW_S = 60.0


class RateLimiterUnavailable(Exception):
    """The shared window cannot be reached: answer 503."""


class RateLimiter(Protocol):
    def admit(self, key: ApiKey, now: float | None = None, *, count: bool = True) -> float | None:
        """None if the request may run (and counts it, unless `count` is False: a peek
        before the request is parsed), else seconds until it may."""


class LocalRateLimiter:
    def __init__(self) -> None:
        self._admitted: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, key: ApiKey, now: float | None = None, *, count: bool = True) -> float | None:
        if key.rpm is None:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._admitted.setdefault(key.id, deque())
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
            if len(times) >= key.rpm:
                return times[0] + WINDOW_S - now if times else WINDOW_S
            if count:
                times.append(now)
            return None


_SLIDING_WINDOW = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] then return tostring(tonumber(oldest[2]) + window - now) end
  return tostring(window)
end
if ARGV[5] == '0' then return false end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return false
"""


class RedisRateLimiter:
    def __init__(self, url: str, prefix: str = "subjective") -> None:
        import redis

        self._errors = redis.exceptions.RedisError
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self._client.register_script(_SLIDING_WINDOW)
        self._prefix = prefix

    def admit(self, key: ApiKey, now: float | None = None, *, count: bool = True) -> float | None:
        if key.rpm is None:
            return None
        now = time.time() if now is None else now  # wall clock: shared by replicas
        try:
            wait = self._script(
                keys=[f"{self._prefix}:rate:{key.id}"],
                args=[repr(now), repr(WINDOW_S), key.rpm, uuid.uuid4().hex, int(count)],
            )
        except self._errors as error:
            raise RateLimiterUnavailable(str(error)) from error
        return None if wait is None else float(wait)

    def close(self) -> None:
        self._client.close()


def open_rate_limiter(env: Mapping[str, str] | None = None) -> LocalRateLimiter | RedisRateLimiter:
    env = os.environ if env is None else env
    if url := env.get("REDIS_URL"):
        return RedisRateLimiter(url)
    return LocalRateLimiter()
