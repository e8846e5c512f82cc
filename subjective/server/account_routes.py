"""Routes about the account rather than the model: usage read-back and the admin threshold."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from subjective.server.errors import APIError
from subjective.server.ledger import LedgerUnavailable, Totals, UsageQuery
from subjective.server.ledger.record import parse_iso
from subjective.server.service import AdminDep, CallerDep, Service, ServiceDep

usage_router = APIRouter()
admin_router = APIRouter(prefix="/admin/v1")
MAX_USAGE_ROWS = 1000


class UsageList(BaseModel):
    object: str = "list"
    data: list[dict[str, Any]]
    # Sums over `data` (the rows returned), exact integers.
    totals: dict[str, int]
    has_more: bool


class ThresholdState(BaseModel):
    model: str
    threshold: float | None  # None: the served model is dense
    by_quality: dict[str, float | None]


class ThresholdUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    threshold: Annotated[float, Field(ge=0.0, le=1.0)]


def _instant(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_iso(text)
    except ValueError as error:
        raise APIError(400, f"'{name}' is not an ISO 8601 time: {text!r}", param=name) from error


@usage_router.get("/v1/usage", response_model=UsageList)
async def read_usage(
    service: ServiceDep,
    key: CallerDep,
    key_id: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_USAGE_ROWS)] = 100,
) -> UsageList:
    """A key's own usage records, oldest first; an admin key may read any key's, or all."""
    if not key.admin:
        if key_id not in (None, key.id):
            raise APIError(403, "A key may read only its own usage.", param="key_id")
        key_id = key.id
    query = UsageQuery(
        api_key_id=key_id,
        model=model,
        since=_instant("since", since),
        until=_instant("until", until),
        limit=limit + 1,
    )
    try:
        records = await asyncio.to_thread(service.ledger.usage, query)
    except LedgerUnavailable as error:
        raise APIError(503, "The usage ledger is unavailable; retry shortly.") from error
    rows = records[:limit]
    totals = Totals.of(rows)
    return UsageList(
        data=[r.to_dict() for r in rows],
        totals={name: getattr(totals, name) for name in totals.__dataclass_fields__},
        has_more=len(records) > limit,
    )


def _threshold_state(service: Service) -> ThresholdState:
    control = service.threshold
    return ThresholdState(
        model=service.config.served_model_name,
        threshold=control.base,
        by_quality=control.by_quality(),
    )


@admin_router.get("/threshold", response_model=ThresholdState)
async def get_threshold(service: ServiceDep, _: AdminDep) -> ThresholdState:
    return _threshold_state(service)


@admin_router.put("/threshold", response_model=ThresholdState)
async def put_threshold(
    update: ThresholdUpdate, service: ServiceDep, _: AdminDep
) -> ThresholdState:
    """Set the base threshold; requests admitted from now on run with it."""
    service.threshold.set(update.threshold)
    return _threshold_state(service)
