"""The served model's surprise threshold: changed at run time, read by every new request.

Each request carries the threshold it runs with to the gate (`SamplingParams.extra_args`),
so a change applies to the requests admitted after it while those in flight finish with
theirs: nothing restarts and nothing is dropped. The quality knob shifts the base by the
model's per-quality offsets (its config's `routing.quality_offsets`).
"""

from __future__ import annotations

import threading

from subjective.model_registry.config import ModelConfig
from subjective.server.config import Quality
from subjective.server.errors import APIError


class ThresholdControl:
    def __init__(self, model: ModelConfig) -> None:
        self.routing = model.routing if model.routing.kind != "dense" else None
        self._base = self.routing.threshold if self.routing else None
        self._lock = threading.Lock()

    @property
    def base(self) -> float | None:
        """None for a model without a gate (dense, hybrid)."""
        return self._base

    def set(self, value: float) -> None:
        if self.routing is None:
            raise APIError(
                400,
                "The served model has no surprise gate: no threshold to set.",
                code="no_threshold",
                param="threshold",
            )
        if not 0.0 <= value <= 1.0:
            raise APIError(400, "threshold must lie in [0, 1].", param="threshold")
        with self._lock:
            self._base = value

    def for_quality(self, quality: Quality) -> float | None:
        """The threshold a request of this quality runs with, within [0, 1]."""
        base = self._base
        if base is None or self.routing is None:
            return None
        return min(1.0, max(0.0, base + self.routing.quality_offsets.get(quality, 0.0)))

    def by_quality(self) -> dict[str, float | None]:
        offsets = self.routing.quality_offsets if self.routing else {}
        return {quality: self.for_quality(quality) for quality in offsets}  # type: ignore[arg-type]
