"""The front end's meter, compute slots, threshold control and limits, without an engine."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from subjective.model_registry.compute_slots import FIELDS, FrontEndSlots, WorkerSlots
from subjective.model_registry.convert import build_model
from subjective.model_registry.tiny import tiny_config
from subjective.server.auth import ANONYMOUS, Authenticator
from subjective.server.errors import APIError
from subjective.server.keys import ApiKey, KeyStore, SQLiteKeyStorage
from subjective.server.ledger import UsageRecord
from subjective.server.ledger.sqlite_backend import SQLiteLedger
from subjective.server.meter import EngineTally, Meter
from subjective.server.rate_limit import LocalRateLimiter, RedisRateLimiter
from subjective.server.threshold import ThresholdControl
from tests.redis_server import RedisServer


@pytest.fixture
def slots(tmp_path: Path):
    table = FrontEndSlots.create(tmp_path / "slots.i64", slots=4)
    yield table
    table.close()


def test_dense_meter_equals_torch_flop_counter_on_the_executed_tokens(slots) -> None:
    """Prompt of 7 with 6 cached: the model runs 1 prompt token, then 3 fed-back tokens.

    One token per forward, so the reference computes no masked score pairs and torch's count
    is exact."""
    torch.manual_seed(0)
    config = tiny_config("dense", layers=3)
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 10))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :6], cache=cache, logits="last")  # the cached prefix: not billed
        with FlopCounterMode(display=False) as counter:
            for position in range(6, 10):
                model(ids[:, position : position + 1], cache=cache, logits="last")
    compute = Meter(config, slots).dense_compute(
        EngineTally(prompt_tokens=7, cached_tokens=6, completion_tokens=4)
    )
    assert compute.flops == compute.dense_flops == counter.get_total_flops()
    assert compute.kv_entries == config.num_hidden_layers * 4


def test_hybrid_meter_equals_torch_flop_counter_on_the_decode_steps(slots) -> None:
    """A hybrid (2 of 3 layers linear): each fed-back token runs the recurrent form, one token per
    forward, so torch's count of those steps is exact; the prompt's chunked form is held to
    torch in test_flops. KV entries in the softmax layer only, the linear layers' state in
    the bytes of its dtype (float32 here, as the reference), `dense_flops` those of the
    all-softmax model of its shape."""
    torch.manual_seed(0)
    dense = tiny_config("dense", layers=3)
    config = replace(dense, layer_types=["linear_attention", "full_attention", "linear_attention"])
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 9))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :5], cache=cache, logits="last")
        with FlopCounterMode(display=False) as counter:
            for position in range(5, 9):
                model(ids[:, position : position + 1], cache=cache, logits="last")
    meter = Meter(config, slots)
    compute = meter.dense_compute(
        EngineTally(prompt_tokens=5, cached_tokens=0, completion_tokens=5)
    )
    prompt = meter.dense_compute(EngineTally(prompt_tokens=5, cached_tokens=0, completion_tokens=1))
    assert compute.flops - prompt.flops == counter.get_total_flops()
    as_dense = Meter(dense, slots).dense_compute(
        EngineTally(prompt_tokens=5, cached_tokens=0, completion_tokens=5)
    )
    assert compute.dense_flops == as_dense.flops != compute.flops
    assert (compute.kv_entries, compute.kv_entries_dense) == (9, 27)
    state = cache.layers[0].state
    assert compute.state_bytes == 2 * state.numel() * 4 == (2 * 6 * 8 * 8) * 4
    assert as_dense.state_bytes == 0
    # Served with a bfloat16 state (vLLM's cache), the same state in half the bytes.
    served = Meter(config, slots, torch.bfloat16).dense_compute(
        EngineTally(prompt_tokens=5, cached_tokens=0, completion_tokens=5)
    )
    assert served.state_bytes == compute.state_bytes // 2


def test_prompt_scoring_bills_the_lm_head_on_every_prompt_token_it_ran(slots) -> None:
    """Prompt logprobs of a 7-token prompt with 2 cached: 5 prompt tokens run, each with its
    logits; the one sampled token is dropped, so nothing else runs."""
    torch.manual_seed(0)
    config = tiny_config("dense", layers=2)
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 7))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :2], cache=cache, logits="last")
        with FlopCounterMode(display=False) as counter:
            for position in range(2, 7):
                model(ids[:, position : position + 1], cache=cache, logits="all")
    meter = Meter(config, slots)
    scored = EngineTally(
        prompt_tokens=7, cached_tokens=2, completion_tokens=0, prompt_logprobs=True
    )
    assert meter.dense_compute(scored).flops == counter.get_total_flops()
    head = 2 * config.hidden_size * config.vocab_size
    unscored = EngineTally(prompt_tokens=7, cached_tokens=2, completion_tokens=0)
    assert meter.dense_compute(scored).flops == meter.dense_compute(unscored).flops + 4 * head


def test_worker_counts_reach_the_front_end_only_for_their_request(
    slots, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = Meter(tiny_config("dense"), slots)
    ticket = meter.open()
    monkeypatch.setenv("SUBJECTIVE_COMPUTE_SLOTS", str(slots.path))
    worker = WorkerSlots.from_env()
    assert worker is not None
    step = np.arange(1, len(FIELDS) + 1, dtype=np.int64)
    worker.add(ticket.slot, ticket.tag, step)
    worker.add(ticket.slot, ticket.tag, step)
    worker.add(ticket.slot, ticket.tag + 1, step * 100)  # another request's tag: dropped
    compute = meter.close(ticket, [])
    # prompt_flops + completion_flops, prompt_dense + completion_dense, kv, kv dense, ...
    assert (compute.flops, compute.dense_flops, compute.kv_entries) == (2 * 4, 2 * 6, 2 * 5)
    assert (compute.token_layers, compute.token_layers_skipped) == (2 * 7, 2 * 8)
    settled = slots.read(ticket.slot)
    worker.add(ticket.slot, ticket.tag, step)  # a late step after the request closed: dropped
    assert slots.read(ticket.slot) == settled


def test_worker_counts_of_prompt_scoring_add_the_lm_head_of_the_other_prompt_tokens(
    slots, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin counts the LM head on the last prompt token only, as for any request."""
    config = tiny_config("dense")
    meter = Meter(config, slots)
    ticket = meter.open()
    monkeypatch.setenv("SUBJECTIVE_COMPUTE_SLOTS", str(slots.path))
    worker = WorkerSlots.from_env()
    assert worker is not None
    worker.add(ticket.slot, ticket.tag, np.arange(1, len(FIELDS) + 1, dtype=np.int64))
    compute = meter.close(ticket, [EngineTally(5, 1, 0, prompt_logprobs=True)])
    head = 2 * config.hidden_size * config.vocab_size
    assert (compute.flops, compute.dense_flops) == (4 + 3 * head, 6 + 3 * head)


def test_unmetered_slot_falls_back_to_the_dense_count(slots) -> None:
    meter = Meter(tiny_config("dense"), slots)
    tallies = [EngineTally(5, 0, 3), EngineTally(5, 0, 2)]
    compute = meter.close(meter.open(), tallies)
    assert compute.flops == sum(meter.dense_compute(t).flops for t in tallies) > 0


def test_slots_are_reused_last(slots) -> None:
    first = slots.acquire()[0]
    slots.release(first)
    taken = [slots.acquire()[0] for _ in range(3)]
    assert first not in taken
    assert slots.acquire()[0] == first
    with pytest.raises(RuntimeError):
        slots.acquire()


def test_threshold_control_shifts_by_quality_and_refuses_bad_values() -> None:
    control = ThresholdControl(tiny_config("sdt"))
    offsets = control.routing.quality_offsets
    base = control.base
    assert control.for_quality("aggressive") == pytest.approx(base + offsets["aggressive"])
    control.set(0.95)
    assert control.for_quality("aggressive") == min(1.0, 0.95 + offsets["aggressive"])
    with pytest.raises(APIError):
        control.set(1.5)
    assert control.base == 0.95
    dense = ThresholdControl(tiny_config("dense"))
    assert dense.base is None and dense.for_quality("conservative") is None
    with pytest.raises(APIError) as refused:
        dense.set(0.5)
    assert refused.value.code == "no_threshold"


def test_rate_limiter_slides_over_one_minute(redis_server: RedisServer) -> None:
    """In memory, and in Redis shared by two replicas: the same window."""
    shared = RedisRateLimiter(redis_server.url)
    replicas = [(LocalRateLimiter(),) * 2, (shared, RedisRateLimiter(redis_server.url))]
    for first, second in replicas:
        key = ApiKey(id="k", name="k", rpm=2)
        assert first.admit(key, now=1000.0) is None
        assert second.admit(key, now=1010.0) is None
        assert first.admit(key, now=1020.0) == pytest.approx(40.0)
        assert second.admit(key, now=1060.5) is None  # the first one left the window
        assert second.admit(ApiKey(id="free", name="free"), now=1000.0) is None


def test_authenticator_identifies_keys_and_enforces_the_budget(tmp_path: Path) -> None:
    keys = KeyStore(SQLiteKeyStorage(tmp_path / "keys.sqlite3"))
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3")
    strict = Authenticator(keys, ledger)
    open_door = Authenticator(keys, ledger, allow_anonymous=True)
    created = keys.create("budgeted", flops_budget=1000)

    async def scenario() -> None:
        assert await open_door.identify(None) == ANONYMOUS
        assert await open_door.identify("Bearer unused") == ANONYMOUS  # a client's placeholder
        with pytest.raises(APIError) as missing:
            await strict.identify(None)
        assert missing.value.status == 401
        with pytest.raises(APIError) as wrong:  # a wrong key is never taken as anonymous
            await open_door.identify("Bearer sk-subj-key_1.x")
        assert wrong.value.status == 401
        key = await strict.identify(f"Bearer {created.secret}")
        assert key.id == created.key.id
        assert await strict.admit(key, f"r-{key.id}", 5000)  # held: nothing spent yet
        with pytest.raises(APIError) as held:  # the first one's worst case holds the budget
            await strict.admit(key, "r-2", 10)
        assert held.value.status == 429
        now = datetime.now(UTC)
        ledger.record(_record(key.id, flops=1000, at=now))  # it ran: its record replaces it
        ledger.release(key.id, f"r-{key.id}")
        with pytest.raises(APIError) as over:
            await strict.admit(key, "r-3", 10)
        assert over.value.status == 429 and over.value.code == "insufficient_quota"
        assert int(over.value.headers["Retry-After"]) >= 1

    try:
        asyncio.run(scenario())
    finally:
        ledger.close()
        keys.close()


def _record(key_id: str, flops: int, at: datetime) -> UsageRecord:
    return UsageRecord(
        request_id=f"r-{key_id}",
        api_key_id=key_id,
        model="m",
        quality="conservative",
        threshold=None,
        prompt_tokens=1,
        completion_tokens=1,
        flops=flops,
        dense_flops=flops,
        kv_entries=1,
        kv_entries_dense=1,
        price_nanos=0,
        started_at=at,
        finished_at=at,
    )


def test_a_request_dropped_unread_gives_its_slot_back(slots, tmp_path: Path) -> None:
    import gc

    from prometheus_client import CollectorRegistry

    from subjective.server.billed_request import BilledRequest, Billing
    from subjective.server.generation import TokenCounts
    from subjective.server.journal import Journal
    from subjective.server.ledger import Pricing, Spool, SpoolingLedger
    from subjective.server.metrics import ServerMetrics
    from subjective.server.usage_writer import UsageWriter

    journal = Journal(tmp_path / "journal.sqlite3")
    ledger = SpoolingLedger(SQLiteLedger(tmp_path / "ledger.sqlite3"), Spool(tmp_path / "spool"))
    metrics = ServerMetrics(CollectorRegistry())
    writer = UsageWriter(ledger, metrics, journal)
    meter = Meter(tiny_config("dense"), slots)
    free = slots.available
    request = BilledRequest(
        request_id="cmpl-1",
        key=ANONYMOUS,
        model="m",
        quality="conservative",
        threshold=None,
        counts=TokenCounts(prompt_lengths=[3]),
        ticket=meter.open(),
        billing=Billing(meter, Pricing(default="1"), writer, metrics, journal),
        streamed=True,
    )
    assert slots.available == free - 1
    del request
    gc.collect()
    writer.close()
    assert slots.available == free
