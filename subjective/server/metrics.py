"""Prometheus metrics of the server (DESIGN.md §7), beside vLLM's own in the same registry.

vLLM's AsyncLLM registers its `vllm:*` metrics in prometheus_client's default registry, so
serving that registry at `/metrics` exposes both.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model", "quality")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass(frozen=True)
class RequestMeasures:
    """What one finished request contributes to the metrics."""

    model: str
    quality: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    flops: int
    dense_flops: int
    kv_entries: int
    kv_entries_dense: int
    skipped_fraction: float
    e2e_seconds: float
    ttft_seconds: float | None


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(name: str, doc: str, labels=LABELS) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry)

        self.requests = counter(
            "subjective_requests", "Finished requests by status.", (*LABELS, "status")
        )
        self.prompt_tokens = counter("subjective_prompt_tokens", "Prompt tokens processed.")
        self.completion_tokens = counter(
            "subjective_completion_tokens", "Completion tokens generated."
        )
        self.flops = counter("subjective_flops", "FLOPs the model executed.")
        self.dense_flops = counter(
            "subjective_dense_flops", "FLOPs a dense model of the same shape would have executed."
        )
        self.kv_entries = counter("subjective_kv_entries", "KV-cache entries written.")
        self.kv_entries_dense = counter(
            "subjective_kv_entries_dense", "KV-cache entries a dense model would have written."
        )
        self.skipped_fraction = histogram(
            "subjective_skipped_token_layer_fraction",
            "Per request: fraction of gated token-layers that took the cheap path.",
            RATIO_BUCKETS,
        )
        self.ttft = histogram(
            "subjective_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        )
        self.time_per_output_token = histogram(
            "subjective_time_per_output_token_seconds",
            "Decode time per output token after the first.",
            PER_TOKEN_BUCKETS,
        )
        self.e2e_latency = histogram(
            "subjective_e2e_request_latency_seconds",
            "End-to-end request latency.",
            LATENCY_BUCKETS,
        )
        self.ledger_write_seconds = Histogram(
            "subjective_ledger_write_seconds",
            "Latency of one usage-record write.",
            buckets=LEDGER_BUCKETS,
            registry=registry,
        )
        self.ledger_write_failures = Counter(
            "subjective_ledger_write_failures",
            "Usage writes that failed and went to the spool.",
            registry=registry,
        )
        self.spool_depth = Gauge(
            "subjective_spool_depth",
            "Usage records waiting in the local spool.",
            registry=registry,
        )
        self.threshold = Gauge(
            "subjective_surprise_threshold",
            "Base surprise threshold of a served model.",
            ("model",),
            registry=registry,
        )

    def observe_request(self, m: RequestMeasures) -> None:
        labels = (m.model, m.quality)
        self.requests.labels(*labels, m.status).inc()
        self.prompt_tokens.labels(*labels).inc(m.prompt_tokens)
        self.completion_tokens.labels(*labels).inc(m.completion_tokens)
        self.flops.labels(*labels).inc(m.flops)
        self.dense_flops.labels(*labels).inc(m.dense_flops)
        self.kv_entries.labels(*labels).inc(m.kv_entries)
        self.kv_entries_dense.labels(*labels).inc(m.kv_entries_dense)
        self.skipped_fraction.labels(*labels).observe(m.skipped_fraction)
        self.e2e_latency.labels(*labels).observe(m.e2e_seconds)
        if m.ttft_seconds is not None:
            self.ttft.labels(*labels).observe(m.ttft_seconds)
            if m.completion_tokens > 1:
                decode = (m.e2e_seconds - m.ttft_seconds) / (m.completion_tokens - 1)
                self.time_per_output_token.labels(*labels).observe(decode)
