"""ServerMetrics: what is observed is what /metrics exposes, value for value."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from subjective.server.metrics import ServerMetrics

M = {"model": "smol", "quality": "aggressive"}


def samples(metrics: ServerMetrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def observe(metrics: ServerMetrics, **overrides: object) -> None:
    fields = dict(
        model="smol",
        quality="aggressive",
        status="completed",
        prompt_tokens=12,
        completion_tokens=5,
        flops=1_000,
        dense_flops=4_000,
        kv_entries=30,
        kv_entries_dense=60,
        state_bytes=2_048,
        token_layers=500,
        token_layers_skipped=350,
        ttft_s=0.03,
        tpot_s=0.012,
        e2e_s=0.2,
    )
    metrics.observe_request(**{**fields, **overrides})


def test_request_observations_are_exposed_exactly() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    observe(metrics)
    observe(metrics, status="cancelled", completion_tokens=2, flops=600, ttft_s=7.0, tpot_s=None)
    observe(metrics, quality="conservative", status="error", ttft_s=None, tpot_s=None, e2e_s=0.01)
    s = samples(metrics)

    assert s[key("subjective_requests_total", **M, status="completed")] == 1
    assert s[key("subjective_requests_total", **M, status="cancelled")] == 1
    conservative = {"model": "smol", "quality": "conservative"}
    assert s[key("subjective_requests_total", **conservative, status="error")] == 1
    assert s[key("subjective_prompt_tokens_total", **M)] == 24
    assert s[key("subjective_completion_tokens_total", **M)] == 7
    assert s[key("subjective_flops_total", **M)] == 1_600
    assert s[key("subjective_dense_flops_total", **M)] == 8_000
    assert s[key("subjective_kv_entries_total", **M)] == 60
    assert s[key("subjective_kv_entries_dense_total", **M)] == 120
    assert s[key("subjective_state_bytes_total", **M)] == 4_096
    assert s[key("subjective_token_layers_total", **M)] == 1_000
    assert s[key("subjective_token_layers_skipped_total", **M)] == 700

    ttft = "subjective_time_to_first_token_seconds"
    assert s[key(f"{ttft}_count", **M)] == 2
    assert s[key(f"{ttft}_sum", **M)] == pytest.approx(7.03)
    assert s[key(f"{ttft}_bucket", **M, le="0.05")] == 1
    assert s[key(f"{ttft}_bucket", **M, le="10.0")] == 2
    tpot = "subjective_time_per_output_token_seconds"
    assert s[key(f"{tpot}_count", **M)] == 1
    assert s[key(f"{tpot}_bucket", **M, le="0.01")] == 0
    assert s[key(f"{tpot}_bucket", **M, le="0.015")] == 1
    assert key(f"{ttft}_count", **conservative) not in s  # no first token, no observation
    e2e = "subjective_e2e_request_latency_seconds"
    assert s[key(f"{e2e}_count", **M, status="completed")] == 1
    assert s[key(f"{e2e}_sum", **conservative, status="error")] == pytest.approx(0.01)


def test_rejections_ledger_writes_and_gauges() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    metrics.observe_rejected(model="smol", status_code=429, error_type="rate_limit_exceeded")
    metrics.observe_rejected(model="smol", status_code=429, error_type="rate_limit_exceeded")
    metrics.observe_rejected(model="nope", status_code=404, error_type="model_not_found")
    metrics.observe_ledger_write(seconds=0.002, outcome="recorded")
    metrics.observe_ledger_write(seconds=0.3, outcome="spooled")
    metrics.set_spool_depth(3)
    metrics.set_threshold("smol", 0.75)
    s = samples(metrics)

    rejected = "subjective_requests_rejected_total"
    limited = {"model": "smol", "status_code": "429", "error_type": "rate_limit_exceeded"}
    assert s[key(rejected, **limited)] == 2
    assert s[key(rejected, model="nope", status_code="404", error_type="model_not_found")] == 1
    ledger = "subjective_ledger_write_seconds"
    assert s[key(f"{ledger}_count", outcome="recorded")] == 1
    assert s[key(f"{ledger}_bucket", outcome="recorded", le="0.0025")] == 1
    assert s[key(f"{ledger}_count", outcome="spooled")] == 1
    assert s[key(f"{ledger}_sum", outcome="spooled")] == pytest.approx(0.3)
    assert s[key(f"{ledger}_count", outcome="failed")] == 0  # exported before any failure
    assert s[key("subjective_spool_depth")] == 3
    assert s[key("subjective_threshold", model="smol")] == 0.75


def test_unknown_status_or_outcome_is_refused() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="status"):
        observe(metrics, status="done")
    with pytest.raises(ValueError, match="outcome"):
        metrics.observe_ledger_write(seconds=0.1, outcome="lost")


def test_building_twice_shares_the_default_registry() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    assert first.registry is second.registry is REGISTRY
    before = samples(second)[key("subjective_spool_depth")]
    first.set_spool_depth(before + 5)
    assert samples(second)[key("subjective_spool_depth")] == before + 5
    first.set_spool_depth(int(before))
