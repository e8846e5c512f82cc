"""One API request from admission to its one usage record.

The request's outputs pass through `deltas`; however they end (finished, client gone,
engine failure) the request settles exactly once: the meter reads what it executed, the
record is handed to the ledger writer and the metrics observe it. Work done before a stop is
billed, with status `cancelled` or `error`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime

from subjective.server.errors import APIError
from subjective.server.generation import ChoiceDelta, TokenCounts
from subjective.server.journal import CHECKPOINT_S, Journal, JournalEntry
from subjective.server.keys import ApiKey
from subjective.server.ledger import Pricing, Status, UsageRecord, WriteResult
from subjective.server.meter import Compute, Meter, Ticket
from subjective.server.metrics import ServerMetrics
from subjective.server.protocol import PromptTokensDetails, Usage
from subjective.server.usage_writer import UsageWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Billing:
    """Where a settled request goes: shared by every request of a server."""

    meter: Meter
    pricing: Pricing
    writer: UsageWriter
    metrics: ServerMetrics
    journal: Journal
    # Token counts of the journaled requests still running, checkpointed by `checkpoints`.
    in_flight: dict[str, TokenCounts] = field(default_factory=dict)


async def checkpoints(billing: Billing, interval_s: float = CHECKPOINT_S) -> None:
    """Checkpoint the token counts of running requests that changed, every `interval_s`."""
    seen: dict[str, int] = {}
    while True:
        await asyncio.sleep(interval_s)
        progress = {}
        for request_id, counts in billing.in_flight.items():
            tokens = counts.total_completion_tokens
            if seen.get(request_id) != tokens:
                seen[request_id] = tokens
                progress[request_id] = counts.to_dict()
        seen = {request_id: seen[request_id] for request_id in billing.in_flight}
        if progress:
            try:
                await asyncio.to_thread(billing.journal.checkpoint, progress)
            except sqlite3.Error:
                log.exception("checkpoint of %d requests failed", len(progress))


class BilledRequest:
    def __init__(
        self,
        *,
        request_id: str,
        key: ApiKey,
        model: str,
        quality: str,
        threshold: float | None,
        counts: TokenCounts,
        ticket: Ticket,
        billing: Billing,
        streamed: bool,
        reserved: bool = False,
    ) -> None:
        self.request_id = request_id
        self.key = key
        self.model = model
        self.quality = quality
        self.threshold = threshold
        self.counts = counts
        self.ticket = ticket
        self.billing = billing
        # Only a stream sees tokens as they come: TTFT and time per token are its figures.
        self.streamed = streamed
        # Its worst case is held against the key's budget until its record is stored.
        self.reserved = reserved
        self.started_at = datetime.now(UTC)
        self._start = time.perf_counter()
        self._first_token: float | None = None
        self._last_token: float | None = None
        self.compute: Compute | None = None
        # Outputs never read (the client left before its stream began) mean nothing ran and
        # nothing settles: the compute slot alone goes back when the request is dropped.
        self._unsettled = [True]
        weakref.finalize(
            self, _release_unused, billing, ticket, (key.id, request_id, reserved), self._unsettled
        )
        self._stored: Future[WriteResult] | None = None

    async def journaled(self) -> None:
        """Journal the request (durably) before it runs: if this server dies, its next start
        bills it. 503 if the journal cannot be written."""
        entry = JournalEntry(
            request_id=self.request_id,
            api_key_id=self.key.id,
            model=self.model,
            quality=self.quality,
            threshold=self.threshold,
            started_at=self.started_at,
            compute_table=str(self.billing.meter.slots.path),
            slot=self.ticket.slot,
            tag=self.ticket.tag,
            reserved=self.reserved,
        )
        try:
            await asyncio.to_thread(self.billing.journal.open, entry, self.counts.to_dict())
        except sqlite3.Error as error:
            self.reject()
            log.error("journal write failed for %s: %s", self.request_id, error)
            raise APIError(503, "The usage journal is unavailable; retry shortly.") from error
        self.billing.in_flight[self.request_id] = self.counts

    async def deltas(self, source: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
        status = Status.ERROR
        try:
            async for delta in source:
                self.counts.add(delta)
                if delta.token_ids:
                    now = time.perf_counter()
                    self._first_token = self._first_token or now
                    self._last_token = now
                yield delta
            status = Status.COMPLETED
        except (asyncio.CancelledError, GeneratorExit):
            status = Status.CANCELLED
            raise
        except APIError as error:
            if error.status < 500:  # vLLM refused the input: its engine never ran it
                self.reject()
            raise
        finally:
            self.settle(status)

    def reject(self) -> None:
        """The request never ran: no charge and no record; its compute slot goes back."""
        if self.compute is not None:
            return
        self._unsettled[0] = False
        self.compute = Compute()
        _release(self.billing, self.ticket, (self.key.id, self.request_id, self.reserved))

    def settle(self, status: Status) -> None:
        """Meter, record and observe the request; later calls do nothing. Never blocks."""
        if self.compute is not None:
            return
        self._unsettled[0] = False
        billing = self.billing
        billing.in_flight.pop(self.request_id, None)
        self.compute = billing.meter.close(self.ticket, self.counts.tallies())
        end = time.perf_counter()
        completion = self.counts.total_completion_tokens
        record = UsageRecord(
            request_id=self.request_id,
            api_key_id=self.key.id,
            model=self.model,
            quality=self.quality,
            threshold=self.threshold,
            prompt_tokens=self.counts.prompt_tokens,
            completion_tokens=completion,
            flops=self.compute.flops,
            dense_flops=self.compute.dense_flops,
            kv_entries=self.compute.kv_entries,
            kv_entries_dense=self.compute.kv_entries_dense,
            state_bytes=self.compute.state_bytes,
            price_nanos=billing.pricing.price_nanos(self.model, self.compute.flops),
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            status=status,
        )
        self._stored = billing.writer.submit(record, reserved=self.reserved)
        first, last = (self._first_token, self._last_token) if self.streamed else (None, None)
        billing.metrics.observe_request(
            model=self.model,
            quality=self.quality,
            status=status.value,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=completion,
            flops=record.flops,
            dense_flops=record.dense_flops,
            kv_entries=record.kv_entries,
            kv_entries_dense=record.kv_entries_dense,
            state_bytes=record.state_bytes,
            token_layers=self.compute.token_layers,
            token_layers_skipped=self.compute.token_layers_skipped,
            ttft_s=None if first is None else first - self._start,
            tpot_s=(
                (last - first) / (completion - 1)
                if first is not None and last is not None and completion > 1
                else None
            ),
            e2e_s=end - self._start,
        )

    async def stored(self) -> None:
        """Wait until the record is in the ledger (or its spool); a failure is only logged."""
        if self._stored is None:
            raise RuntimeError("the request has not settled")
        try:
            await asyncio.wrap_future(self._stored)
        except Exception:
            log.error("usage of %s was not stored (see the writer's log)", self.request_id)

    def usage(self) -> Usage:
        if self.compute is None:
            raise RuntimeError("the request has not settled")
        completion = self.counts.total_completion_tokens
        return Usage(
            prompt_tokens=self.counts.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.counts.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(self.counts.cached_tokens.values())
            ),
            compute=self.compute.usage(),
        )


def _release(billing: Billing, ticket: Ticket, held: tuple[str, str, bool]) -> None:
    """The compute slot, journal entry and budget reservation of a request that never ran."""
    billing.meter.release(ticket)
    key_id, request_id, reserved = held
    billing.in_flight.pop(request_id, None)
    billing.writer.forget(key_id, request_id, reserved=reserved)


def _release_unused(
    billing: Billing, ticket: Ticket, held: tuple[str, str, bool], unsettled: list[bool]
) -> None:
    if unsettled[0]:
        _release(billing, ticket, held)
