"""Who is calling, and may they run now: API keys, admin rights, request rate, FLOP budget.

Keys come as `Authorization: Bearer <secret>` (what the OpenAI clients send). A missing or
unknown key is a 401, a non-admin key on an admin route a 403, and a key over its requests
per minute or over its executed-FLOP budget for the current period a 429 with Retry-After.
Budgets are read from the ledger, so every replica sharing it enforces the same spend.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

from fastapi import Request

from subjective.server.errors import APIError
from subjective.server.keys import SECRET_PREFIX, ApiKey, KeyStore, KeyStoreUnavailable
from subjective.server.ledger import Ledger, LedgerUnavailable
from subjective.server.rate_limit import LocalRateLimiter, RateLimiter, RateLimiterUnavailable

# Whoever calls without a key when the server allows it (`subjective serve --allow-anonymous`).
ANONYMOUS = ApiKey(id="anonymous", name="anonymous")


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

    async def admit(self, key: ApiKey) -> None:
        """Raise 429 when the key is over its rate or its FLOP budget."""
        try:
            wait = await asyncio.to_thread(self.rates.admit, key)
        except RateLimiterUnavailable as error:
            raise APIError(503, "The rate limiter is unavailable; retry shortly.") from error
        if wait is not None:
            raise _too_many(
                f"Rate limit reached: {key.rpm} requests per minute.",
                "rate_limit_exceeded",
                wait,
            )
        if key.flops_budget is None:
            return
        start, end = key.budget_window()
        try:
            spent = await asyncio.to_thread(self.ledger.totals, key.id, start, end)
        except LedgerUnavailable as error:
            raise APIError(503, "The usage ledger is unavailable; retry shortly.") from error
        if spent.flops >= key.flops_budget:
            raise _too_many(
                f"Compute budget exhausted: {spent.flops} of {key.flops_budget} FLOPs this "
                f"{key.budget_period}. It renews at {end.isoformat()}.",
                "insufficient_quota",
                (end - datetime.now(UTC)).total_seconds(),
            )


def _too_many(message: str, code: str, retry_after_s: float) -> APIError:
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(429, message, code=code, headers={"Retry-After": str(seconds)})


def get_authenticator(request: Request) -> Authenticator:
    return request.app.state.service.authenticator


async def caller(request: Request) -> ApiKey:
    """Dependency of every /v1 route: the identified key.

    Rate and budget are checked by the route once the request is valid (`Authenticator.admit`),
    so a request rejected as invalid never uses up a key's allowance.
    """
    return await get_authenticator(request).identify(request.headers.get("authorization"))


async def admin_key(request: Request) -> ApiKey:
    """Dependency of `/admin/*`: an admin key; anonymous callers never are."""
    key = await caller(request)
    if not key.admin:
        raise APIError(403, "This route needs an admin key.", code="admin_required")
    return key
