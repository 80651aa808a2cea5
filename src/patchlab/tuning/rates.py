"""Rates a threshold gives on a set of images, each with its exact 95% interval.

A rate measured on 40 images can be far from the rate the line will see. Clopper-Pearson
intervals are exact binomial intervals: they hold their 95% coverage at every count, which is
what a sign-off needs (Wilson's are narrower but can undercover at small counts).
"""

import math
import re
from dataclasses import dataclass

import torch
from scipy.stats import beta

CONFIDENCE = 0.95
MOST_IMAGES = 10**9  # images_to_confirm looks no further


@dataclass(frozen=True)
class Rate:
    """`hits` out of `count` images, e.g. 39 of 40 defective images rejected."""

    hits: int
    count: int
    noun: str  # what was counted, for the printed line: "defective images", "good images"

    @property
    def value(self) -> float:
        return self.hits / self.count if self.count else math.nan

    def interval(self) -> tuple[float, float]:
        """The Clopper-Pearson 95% interval; (NaN, NaN) without images."""
        if not self.count:
            return math.nan, math.nan
        tail = (1 - CONFIDENCE) / 2
        low = beta.ppf(tail, self.hits, self.count - self.hits + 1) if self.hits else 0.0
        full = self.hits == self.count
        high = 1.0 if full else beta.ppf(1 - tail, self.hits + 1, self.count - self.hits)
        return float(low), float(high)

    def metrics(self, name: str) -> dict[str, float]:
        """`name`, `name_ci_low`, `name_ci_high` and `name_count`, as logged."""
        low, high = self.interval()
        return {name: self.value, f"{name}_ci_low": low, f"{name}_ci_high": high} | {
            f"{name}_count": float(self.count)
        }

    def line(self, what: str) -> str:
        """`held-out recall 1.000 (95% CI 0.91-1.00, 40 defective images)`."""
        if not self.count:
            return f"{what}: no {self.noun}"
        low, high = self.interval()
        return f"{what} {self.value:.3f} (95% CI {low:.2f}-{high:.2f}, {self.count} {self.noun})"


def images_to_confirm(bound: float, observed: float = 0.0) -> int | None:
    """How many images, failing at the `observed` rate, put a failure rate's 95% upper
    Clopper-Pearson bound at `bound`: 72 good images without a false reject bound the
    false-reject rate at 0.05, and at a measured 0.042 it takes thousands. None when no count
    up to MOST_IMAGES can: the observed rate is at, above or just below the bound.

    The failures are counted as the fraction they are (`observed * count`), not rounded: the
    bound then falls steadily with the count, and the search finds its first count below
    `bound`.
    """

    def confirms(count: int) -> bool:
        failures = observed * count
        tail = (1 - CONFIDENCE) / 2
        return float(beta.ppf(1 - tail, failures + 1, count - failures)) <= bound

    if not observed < bound or not confirms(MOST_IMAGES):
        return None
    high = 1
    while not confirms(high):
        high *= 2
    low = high // 2  # does not confirm (or 0): the fewest that do lie in (low, high]
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if confirms(middle) else (middle, high)
    return high


def decision_rates(
    scores: torch.Tensor, labels: torch.Tensor, types: list[str], threshold: float
) -> dict[str, Rate]:
    """What rejecting images scored at or above `threshold` gives: recall, false-reject rate,
    precision, and the recall of each defect type (`recall/<type>`)."""
    rejected, defective = scores >= threshold, labels.bool()
    rates = {
        "recall": Rate(_count(rejected & defective), _count(defective), "defective images"),
        "false_reject_rate": Rate(_count(rejected & ~defective), _count(~defective), "good images"),
        "precision": Rate(_count(rejected & defective), _count(rejected), "rejected images"),
    }
    for name in defect_types(types, defective):
        of_type = torch.tensor([t == name for t in types]) & defective
        rates[f"recall/{name}"] = Rate(
            _count(rejected & of_type), _count(of_type), f"{name} images"
        )
    return rates


def defect_types(types: list[str], defective: torch.Tensor) -> list[str]:
    """The defect types among the defective images, sorted."""
    return sorted({t for t, bad in zip(types, defective.tolist(), strict=True) if bad})


def _count(flags: torch.Tensor) -> int:
    return int(flags.sum())


def metric_name(name: str) -> str:
    """`name` with what MLflow refuses in a metric name (a defect folder may be called
    `crack (deep)`) replaced by `_`: alphanumerics, `_ - . /` and spaces stay."""
    return re.sub(r"[^\w\-. /]", "_", name)


def rate_metrics(part: str, rates: dict[str, Rate]) -> dict[str, float]:
    """`<part>_image_recall`, `<part>_image_recall/crack_ci_low`, ... for metrics and MLflow."""
    found: dict[str, float] = {}
    for name, rate in rates.items():
        found |= rate.metrics(metric_name(f"{part}_image_{name}"))
    return found
