"""Where a line rejects a part: the image threshold an objective picks on validation images.

A factory does not run at the F1-optimal threshold; it sets one from what an escape costs
against what a false reject costs. Each objective below is one way a line states that, and each
is met exactly on the validation images (the held-out part then shows how well it carries).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from patchlab.core.metrics import f1_max
from patchlab.errors import SettingError, UserError, check_limits
from patchlab.tuning.rates import Rate, defect_types, images_to_confirm

OBJECTIVES = ("f1", "false_reject", "recall", "cost")


@dataclass(frozen=True)
class OperatingPoint:
    """How the image threshold is chosen on validation images.

    Args:
        objective: "f1": the F1-optimal threshold. "false_reject": catch the most defective
            images while rejecting at most `target` of the good ones. "recall": reject the
            fewest good images while catching at least `target` of the defective ones (of each
            defect type with `per_type`). "cost": the least expected cost when an escape costs
            `escape_cost` false rejects, at a line's `defect_rate`.
        target: The rate "false_reject" and "recall" hold, in [0, 1].
        per_type: "recall" holds the target for every defect type, not only overall.
        escape_cost: "cost": what one escaped defective part costs, in false rejects.
        defect_rate: "cost": the share of defective parts on the line; None takes the
            validation images' share (MVTec's test sets are mostly defective; a line is not).
    """

    LIMITS: ClassVar = {
        "objective": [("in", list(OBJECTIVES))],
        "escape_cost": [(">", 0)],
    }
    objective: str = "f1"
    target: float | None = None
    per_type: bool = False
    escape_cost: float = 1.0
    defect_rate: float | None = None

    def __post_init__(self) -> None:
        check_limits(self.LIMITS, vars(self))
        needs_target = self.objective in ("false_reject", "recall")
        if needs_target and (self.target is None or not 0 <= self.target <= 1):
            raise SettingError(
                f"{{operating_point.target}} must be a rate in [0, 1] for objective "
                f"{self.objective}, got {self.target}"
            )
        if self.defect_rate is not None and not 0 < self.defect_rate < 1:
            raise SettingError(
                f"{{operating_point.defect_rate}} must be in (0, 1) or null, got {self.defect_rate}"
            )

    def label(self) -> str:
        """Short and unique, for run names, predict's CSV and reports: `false_reject<=0.05`."""
        if self.objective == "false_reject":
            return f"false_reject<={self.target:g}"
        if self.objective == "recall":
            return f"recall>={self.target:g}" + (" per type" if self.per_type else "")
        if self.objective == "cost":
            rate = "" if self.defect_rate is None else f" at {self.defect_rate:g} defective"
            return f"cost {self.escape_cost:g}:1{rate}"
        return "f1"

    def target_note(self, rate: str) -> str:
        """`; target <= 0.05` after the line of the rate this objective holds, else nothing."""
        targeted = self.objective == "false_reject" and rate == "false_reject_rate"
        if targeted:
            return f"; target <= {self.target:g}"
        overall = rate == "recall" or (self.per_type and rate.startswith("recall/"))
        return f"; target >= {self.target:g}" if self.objective == "recall" and overall else ""

    def unconfirmed(self, rates: dict[str, Rate]) -> str | None:
        """A line saying when held-out `rates` are too few to confirm the target, and how
        many images would: at 10 good images a measured 0 false rejects still allows 0.31."""
        if self.objective == "false_reject":
            rate, far, bound = rates["false_reject_rate"], 1, self.target
            failing = "false reject"
        elif self.objective == "recall":
            rate, far, bound = rates["recall"], 0, 1 - self.target
            failing = "escape"
        else:
            return None
        end = rate.interval()[far]
        if rate.count and (end <= bound if far else end >= 1 - bound):
            return None
        needed = images_to_confirm(bound)
        enough = (
            f"{needed} {rate.noun} with no {failing} would"
            if needed
            else f"no count of {rate.noun} can"
        )
        return (
            f"held-out images cannot confirm the target {self.label()}: the 95% CI reaches "
            f"{end:.2f} with {rate.count} {rate.noun}; {enough}"
        )

    def choose(self, scores: torch.Tensor, labels: torch.Tensor, types: list[str]) -> float:
        """The image threshold (reject at or above it) that meets the objective on these
        validation images; between two validation scores, so it decides them with a margin."""
        defective = labels.bool()
        if not bool(defective.any()) or bool(defective.all()):
            raise UserError(
                f"operating_point.objective={self.objective} needs good and defective "
                f"validation images; the validation part has {int(defective.sum())} defective "
                f"of {len(labels)}"
            )
        if self.objective == "f1":
            return f1_max(scores, labels)[1]
        candidates = torch.unique(scores.double())  # ascending; each one rejects itself and up
        caught = _at_or_above(scores[defective], candidates)
        rejected_good = _at_or_above(scores[~defective], candidates)
        recall = caught / int(defective.sum())
        false_reject = rejected_good / int((~defective).sum())
        if self.objective == "false_reject":
            feasible = false_reject <= self.target + 1e-12
            best = _first(feasible, -recall, false_reject)
        elif self.objective == "recall":
            feasible = recall >= self.target - 1e-12
            for name in defect_types(types, defective) if self.per_type else []:
                of_type = torch.tensor([t == name for t in types]) & defective
                feasible &= _at_or_above(scores[of_type], candidates) / int(of_type.sum()) >= (
                    self.target - 1e-12
                )
            best = _first(feasible, false_reject, -recall)
        else:
            share = (
                float(defective.float().mean()) if self.defect_rate is None else self.defect_rate
            )
            cost = self.escape_cost * share * (1 - recall) + (1 - share) * false_reject
            best = _first(torch.ones_like(cost, dtype=torch.bool), cost, false_reject)
        if best is None:  # nothing catches enough below the top score: reject nothing
            return math.nextafter(float(candidates[-1]), math.inf)
        if best == 0:
            return float(candidates[0])
        return float((candidates[best] + candidates[best - 1]) / 2)


def _at_or_above(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """How many of `scores` each candidate threshold rejects (float64 counts)."""
    ordered = scores.double().sort().values
    return (len(ordered) - torch.searchsorted(ordered, candidates)).double()


def _first(feasible: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> int | None:
    """The feasible candidate with the smallest `first`, then `second`; None if none is."""
    order = np.lexsort((second.numpy(), first.numpy()))
    order = order[feasible.numpy()[order]]
    return int(order[0]) if len(order) else None
