"""Prometheus metrics of the server: requests, tokens, the FLOPs metered, latency, ledger.

Registered in prometheus_client's default registry, beside the `vllm:*` metrics vLLM's engine
registers there in the same process, so one `/metrics` serves both. The collectors are made
once per registry: building `ServerMetrics` again (one app per test) reuses them.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REQUEST_STATUSES = ("completed", "cancelled", "error")
LEDGER_OUTCOMES = ("recorded", "duplicate", "spooled", "failed")

# From a few ms (GPU, short prompt) to over a minute (CPU, long prompt under load).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
# 1 ms (fast GPU decode) to 1 s; a CPU at 20-300 tokens/s lands between 3.3 and 50 ms.
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1
)  # fmt: skip
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
# SQLite on local disk or Redis on the LAN: sub-millisecond to a few ms; timeouts up to seconds.
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_LABELS = ("model", "quality")


@dataclass(frozen=True)
class _Collectors:
    requests: Counter
    rejected: Counter
    prompt_tokens: Counter
    completion_tokens: Counter
    flops: Counter
    dense_flops: Counter
    kv_entries: Counter
    kv_entries_dense: Counter
    state_bytes: Counter
    token_layers: Counter
    token_layers_skipped: Counter
    ttft: Histogram
    tpot: Histogram
    e2e: Histogram
    ledger_write: Histogram
    spool_depth: Gauge
    threshold: Gauge


def _build(registry: CollectorRegistry) -> _Collectors:
    def counter(name: str, doc: str, labels: tuple[str, ...] = _LABELS) -> Counter:
        return Counter(name, doc, labels, registry=registry)

    def histogram(
        name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = _LABELS
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=registry)

    collectors = _Collectors(
        requests=counter(
            "subjective_requests", "Requests run, by final status.", (*_LABELS, "status")
        ),
        rejected=counter(
            "subjective_requests_rejected",
            "Requests rejected before running (400, 401, 403, 404, 429).",
            ("model", "status_code", "error_type"),
        ),
        prompt_tokens=counter("subjective_prompt_tokens", "Prompt tokens processed."),
        completion_tokens=counter("subjective_completion_tokens", "Completion tokens generated."),
        flops=counter("subjective_flops", "FLOPs executed (metered and billed)."),
        dense_flops=counter(
            "subjective_dense_flops", "FLOPs a dense model of the same shape would have executed."
        ),
        kv_entries=counter("subjective_kv_entries", "KV-cache entries written."),
        kv_entries_dense=counter(
            "subjective_kv_entries_dense", "KV-cache entries a dense model would have written."
        ),
        state_bytes=counter(
            "subjective_state_bytes", "Recurrent-state bytes held by hybrids' linear layers."
        ),
        token_layers=counter(
            "subjective_token_layers", "(token, gated layer) pairs the router decided."
        ),
        token_layers_skipped=counter(
            "subjective_token_layers_skipped", "Of those, the pairs that took the cheap path."
        ),
        ttft=histogram(
            "subjective_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        ),
        tpot=histogram(
            "subjective_time_per_output_token_seconds",
            "Time per output token after the first, per request.",
            TPOT_BUCKETS,
        ),
        e2e=histogram(
            "subjective_e2e_request_latency_seconds",
            "End-to-end request latency, by final status.",
            E2E_BUCKETS,
            (*_LABELS, "status"),
        ),
        ledger_write=histogram(
            "subjective_ledger_write_seconds",
            "Ledger write latency by outcome; its _count is the writes per outcome.",
            LEDGER_BUCKETS,
            ("outcome",),
        ),
        spool_depth=Gauge(
            "subjective_spool_depth", "Usage records waiting on local disk.", registry=registry
        ),
        threshold=Gauge(
            "subjective_threshold", "Base surprise threshold.", ("model",), registry=registry
        ),
    )
    for outcome in LEDGER_OUTCOMES:  # every outcome exported from the start, at zero
        collectors.ledger_write.labels(outcome=outcome)
    return collectors


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class ServerMetrics:
    """The server's metrics in `registry` (default: prometheus_client's, shared with vLLM)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        with _lock:
            if registry not in _collectors:
                _collectors[registry] = _build(registry)
            self._c = _collectors[registry]

    def observe_request(
        self,
        *,
        model: str,
        quality: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        flops: int,
        dense_flops: int,
        kv_entries: int,
        kv_entries_dense: int,
        state_bytes: int = 0,
        token_layers: int,
        token_layers_skipped: int,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
    ) -> None:
        """One finished request; `ttft_s`/`tpot_s` are None when it produced no such interval."""
        if status not in REQUEST_STATUSES:
            raise ValueError(f"status {status!r} not in {REQUEST_STATUSES}")
        c, labels = self._c, {"model": model, "quality": quality}
        c.requests.labels(**labels, status=status).inc()
        c.prompt_tokens.labels(**labels).inc(prompt_tokens)
        c.completion_tokens.labels(**labels).inc(completion_tokens)
        c.flops.labels(**labels).inc(flops)
        c.dense_flops.labels(**labels).inc(dense_flops)
        c.kv_entries.labels(**labels).inc(kv_entries)
        c.kv_entries_dense.labels(**labels).inc(kv_entries_dense)
        c.state_bytes.labels(**labels).inc(state_bytes)
        c.token_layers.labels(**labels).inc(token_layers)
        c.token_layers_skipped.labels(**labels).inc(token_layers_skipped)
        if ttft_s is not None:
            c.ttft.labels(**labels).observe(ttft_s)
        if tpot_s is not None:
            c.tpot.labels(**labels).observe(tpot_s)
        c.e2e.labels(**labels, status=status).observe(e2e_s)

    def observe_rejected(self, *, model: str, status_code: int, error_type: str) -> None:
        """A request refused before it ran."""
        self._c.rejected.labels(
            model=model, status_code=str(status_code), error_type=error_type
        ).inc()

    def observe_ledger_write(self, *, seconds: float, outcome: str) -> None:
        """One usage record handed to the ledger, and where it ended."""
        if outcome not in LEDGER_OUTCOMES:
            raise ValueError(f"outcome {outcome!r} not in {LEDGER_OUTCOMES}")
        self._c.ledger_write.labels(outcome=outcome).observe(seconds)

    def set_spool_depth(self, n: int) -> None:
        self._c.spool_depth.set(n)

    def set_threshold(self, model: str, value: float) -> None:
        self._c.threshold.labels(model=model).set(value)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of the whole registry (vLLM's metrics included) and its type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
