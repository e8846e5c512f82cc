"""Who is calling, and may they run now: API keys, admin rights, request rate, FLOP budget.

Keys come as `Authorization: Bearer <secret>` (what the OpenAI clients send). A missing or
unknown key is a 401, a non-admin key on an admin route a 403, and a key over its requests
per minute or over its executed-FLOP budget for the current period a 429 with Retry-After.
Budgets are read from the ledger, so every replica sharing it enforces the same spend.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

from fastapi import Request

from subjective.server.admission import STATE_KEY
from subjective.server.errors import APIError
from subjective.server.keys import SECRET_PREFIX, ApiKey, KeyStore, KeyStoreUnavailable
from subjective.server.ledger import Ledger, LedgerUnavailable, Reservation
from subjective.server.rate_limit import LocalRateLimiter, RateLimiter, RateLimiterUnavailable

# Whoever calls without a key when the server allows it (`subjective serve --allow-anonymous`).
ANONYMOUS = ApiKey(id="anonymous", name="anonymous")
# A reservation its server never released (the process died) stops holding budget after this;
# far longer than any request runs.
RESERVATION_TTL = timedelta(hours=1)


class Authenticator:
    def __init__(
        self,
        keys: KeyStore,
        ledger: Ledger,
        rates: RateLimiter | None = None,
        *,
        allow_anonymous: bool = False,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.rates = rates or LocalRateLimiter()
        self.allow_anonymous = allow_anonymous

    async def identify(self, authorization: str | None) -> ApiKey:
        """The caller's key. With anonymous access on, a request without one of our keys
        (none, or a placeholder such as the OpenAI clients' mandatory `api_key`) runs as
        `anonymous`; a key of ours that does not verify (wrong, revoked) is still a 401."""
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if self.allow_anonymous and not secret.startswith(SECRET_PREFIX):
            return ANONYMOUS
        if not authorization:
            raise APIError(
                401,
                "You didn't provide an API key. Send 'Authorization: Bearer <key>' "
                "(create one with `subjective keys create`).",
                code="invalid_api_key",
            )
        key = None
        if scheme.lower() == "bearer" and secret:
            try:
                key = await asyncio.to_thread(self.keys.verify, secret)
            except KeyStoreUnavailable as error:
                raise APIError(503, "The key store is unavailable; retry shortly.") from error
        if key is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    async def check_rate(self, key: ApiKey) -> None:
        """Raise 429 when the key is over its rate already, without counting this request:
        a cheap refusal before its body is parsed."""
        await self._rate(key, count=False)

    async def _rate(self, key: ApiKey, *, count: bool) -> None:
        try:
            wait = await asyncio.to_thread(self.rates.admit, key, count=count)
        except RateLimiterUnavailable as error:
            raise APIError(503, "The rate limiter is unavailable; retry shortly.") from error
        if wait is not None:
            raise _too_many(
                f"Rate limit reached: {key.rpm} requests per minute.",
                "rate_limit_exceeded",
                wait,
            )

    async def admit(self, key: ApiKey, request_id: str, worst_case_flops: int) -> bool:
        """Count the request against the key's rate and, for a key with a FLOP budget,
        reserve its worst case against it (True: reserved; release it once the request's
        record is stored). Raise 429 when the key is over its rate or its budget."""
        await self._rate(key, count=True)
        if key.flops_budget is None:
            return False
        start, end = key.budget_window()
        now = datetime.now(UTC)
        reservation = Reservation(
            request_id=request_id,
            api_key_id=key.id,
            flops=worst_case_flops,
            budget=key.flops_budget,
            since=start,
            until=end,
            expires_at=now + RESERVATION_TTL,
        )
        try:
            committed = await asyncio.to_thread(self.ledger.reserve, reservation)
        except LedgerUnavailable as error:
            raise APIError(503, "The usage ledger is unavailable; retry shortly.") from error
        if committed is not None:
            raise _too_many(
                f"Compute budget exhausted: {committed} of {key.flops_budget} FLOPs this "
                f"{key.budget_period} spent or held by running requests. It renews at "
                f"{end.isoformat()}.",
                "insufficient_quota",
                (end - now).total_seconds(),
            )
        return True


def _too_many(message: str, code: str, retry_after_s: float) -> APIError:
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(429, message, code=code, headers={"Retry-After": str(seconds)})


def get_authenticator(request: Request) -> Authenticator:
    return request.app.state.service.authenticator


async def caller(request: Request) -> ApiKey:
    """Dependency of every /v1 route: the identified key (by `AdmissionGate`, before the
    body was read, or here).

    Rate and budget are checked by the route once the request is valid (`Authenticator.admit`),
    so a request rejected as invalid never uses up a key's allowance.
    """
    identified = getattr(request.state, STATE_KEY, None)
    if identified is not None:
        return identified
    return await get_authenticator(request).identify(request.headers.get("authorization"))


async def admin_key(request: Request) -> ApiKey:
    """Dependency of `/admin/*`: an admin key; anonymous callers never are."""
    key = await caller(request)
    if not key.admin:
        raise APIError(403, "This route needs an admin key.", code="admin_required")
    return key
