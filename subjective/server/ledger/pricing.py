"""Price of executed compute: a rate per model per TFLOP (10^12 FLOPs), exact in Decimal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext

from subjective.server.ledger.record import NANOS_PER_UNIT

FLOPS_PER_TFLOP = 10**12


@dataclass(frozen=True)
class Pricing:
    """`per_tflop` maps model name to currency units per TFLOP; `default` covers the rest.

    Give rates as strings or Decimals ("0.0025"), never floats: a float rate is already
    rounded before it arrives.
    """

    per_tflop: Mapping[str, Decimal | str] = field(default_factory=dict)
    default: Decimal | str | None = None
    currency: str = "USD"

    def __post_init__(self) -> None:
        rates = {model: _decimal(rate) for model, rate in self.per_tflop.items()}
        object.__setattr__(self, "per_tflop", rates)
        if self.default is not None:
            object.__setattr__(self, "default", _decimal(self.default))

    def rate(self, model: str) -> Decimal:
        rate = self.per_tflop.get(model, self.default)
        if rate is None:
            raise KeyError(f"no price configured for model {model!r}")
        return Decimal(rate)

    def price_nanos(self, model: str, flops: int) -> int:
        """Price of `flops` executed FLOPs in nano-units, rounded half-up once per request."""
        with localcontext() as context:
            context.prec = 60  # 19-digit FLOP counts times any sane rate stay exact
            exact = Decimal(flops) * self.rate(model) * NANOS_PER_UNIT / FLOPS_PER_TFLOP
            return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _decimal(rate: Decimal | str) -> Decimal:
    if isinstance(rate, float):
        raise TypeError(f"rate {rate!r} is a float: give a string or Decimal")
    value = Decimal(rate)
    if value < 0:
        raise ValueError(f"negative rate {rate!r}")
    return value
