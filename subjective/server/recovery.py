"""On start: bill the requests a dead server left in flight, then reclaim its shared memory."""

from __future__ import annotations

import contextlib
import logging

from subjective.model_registry.compute_slots import read_left_row, reclaim_left_tables
from subjective.server.generation import TokenCounts
from subjective.server.journal import Journal, Orphan
from subjective.server.ledger import (
    LedgerUnavailable,
    Pricing,
    SpoolingLedger,
    Status,
    UsageRecord,
)
from subjective.server.meter import Meter

log = logging.getLogger(__name__)


def recover_interrupted(
    journal: Journal, ledger: SpoolingLedger, meter: Meter, pricing: Pricing
) -> int:
    """One record per orphaned journal entry (stored or spooled): the request's own if it had
    ended, else an `interrupted` one; then its entry goes. Returns how many. Shared-memory
    tables of dead servers are deleted after."""
    orphans = journal.orphans()
    for orphan in orphans:
        ledger.record(orphan.record or interrupted_record(orphan, meter, pricing))
        entry = orphan.entry
        if entry.reserved:
            with contextlib.suppress(LedgerUnavailable):  # else it lapses on its own
                ledger.release(entry.api_key_id, entry.request_id)
        journal.close(entry.request_id)
    if orphans:
        log.warning("billed %d requests a stopped server left unstored", len(orphans))
    for path in reclaim_left_tables():
        log.info("reclaimed %s, left by a dead server", path)
    return len(orphans)


def interrupted_record(orphan: Orphan, meter: Meter, pricing: Pricing) -> UsageRecord:
    """The work done until the server died: the worker's counts where it metered the request
    (its row outlives the process), else the tokens of the last checkpoint."""
    entry = orphan.entry
    counts = TokenCounts.from_dict(orphan.counts)
    executed = read_left_row(entry.compute_table, entry.slot, entry.tag)
    compute = meter.compute_of(executed, counts.tallies())
    return UsageRecord(
        request_id=entry.request_id,
        api_key_id=entry.api_key_id,
        model=entry.model,
        quality=entry.quality,
        threshold=entry.threshold,
        prompt_tokens=counts.prompt_tokens,
        completion_tokens=counts.total_completion_tokens,
        flops=compute.flops,
        dense_flops=compute.dense_flops,
        kv_entries=compute.kv_entries,
        kv_entries_dense=compute.kv_entries_dense,
        price_nanos=pricing.price_nanos(entry.model, compute.flops),
        started_at=entry.started_at,
        finished_at=max(orphan.checkpointed_at, entry.started_at),
        status=Status.INTERRUPTED,
    )
