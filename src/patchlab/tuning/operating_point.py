"""Where a line rejects a part: the image threshold an objective picks on validation images.

A factory does not run at the F1-optimal threshold; it sets one from what an escape costs
against what a false reject costs. Each objective below is one way a line states that, and each
is met exactly on the validation images (the held-out part then shows how well it carries).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
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
        for name in ("target", "escape_cost", "defect_rate"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int | float):
                raise SettingError(f"{{{name}}} must be a number, got {value!r}")
        check_limits(self.LIMITS, vars(self))
        needs_target = self.objective in ("false_reject", "recall")
        if needs_target and (self.target is None or not 0 <= self.target <= 1):
            raise SettingError(
                f"{{target}} must be a rate in [0, 1] for objective {self.objective}, "
                f"got {self.target}"
            )
        if self.defect_rate is not None and not 0 < self.defect_rate < 1:
            raise SettingError(f"{{defect_rate}} must be in (0, 1) or null, got {self.defect_rate}")

    @classmethod
    def of(cls, settings: Mapping) -> "OperatingPoint":
        """From `threshold.operating_point`; messages name the settings by that path."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(known))
        try:
            if unknown:
                raise SettingError(f"{{{unknown[0]}}} is not a setting; there are {known}")
            return cls(**settings)
        except SettingError as error:
            raise SettingError(error.template.replace("{", "{operating_point.")) from error

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

    def unconfirmed(self, rates: dict[str, Rate]) -> list[str]:
        """Lines saying where held-out `rates` are too few to confirm the target, and how many
        images would: at 10 good images a measured 0 false rejects still allows 0.31."""
        if self.objective == "false_reject":
            checked, bound, failing = ["false_reject_rate"], self.target, "false reject"
        elif self.objective == "recall":
            per_type = [name for name in rates if self.per_type and name.startswith("recall/")]
            checked, bound, failing = ["recall", *per_type], 1 - self.target, "escape"
        else:
            return []
        lines = []
        for name in checked:
            rate = rates[name]
            far = 1 if self.objective == "false_reject" else 0
            end = rate.interval()[far]
            if rate.count and (end <= bound if far else end >= 1 - bound):
                continue
            what = "" if name in ("recall", "false_reject_rate") else f" for {name[7:]}"
            if not rate.count:
                lines.append(f"no held-out {rate.noun} to confirm {self.label()}{what}")
                continue
            observed = rate.value if far else 1 - rate.value  # the failing fraction
            needed = images_to_confirm(bound, observed)
            if needed is None:
                at = f" at the measured {observed:.3f}" if bound > 0 else ""
                enough = f"no count of {rate.noun} can{at}"
            elif observed == 0:
                enough = f"{needed} {rate.noun} with no {failing} would"
            else:
                enough = f"about {needed} {rate.noun} at the measured rate would"
            lines.append(
                f"held-out images cannot confirm {self.label()}{what}: the 95% CI reaches "
                f"{end:.2f} with {rate.count} {rate.noun}; {enough}"
            )
        return lines

    def choose(self, scores: torch.Tensor, labels: torch.Tensor, types: list[str]) -> float:
        """The image threshold (reject at or above it) that meets the objective on these
        validation images. Except for f1 (the F1-max threshold, as untuned runs report it) it
        sits between two validation scores, so it decides them with a margin, and is exact in
        the scores' precision: a float32 score compared with it decides as on validation."""
        defective = labels.bool()
        if not bool(defective.any()) or bool(defective.all()):
            raise UserError(
                f"operating_point.objective={self.objective} needs good and defective "
                f"validation images; the validation part has {int(defective.sum())} defective "
                f"of {len(labels)}"
            )
        if self.objective == "f1":
            return f1_max(scores, labels)[1]
        # Ascending; each rejects itself and up. The last, just above every score, rejects none.
        distinct = torch.unique(scores)
        above = torch.nextafter(distinct[-1:], torch.tensor([math.inf], dtype=scores.dtype))
        candidates = torch.cat([distinct, above])
        recall = _at_or_above(scores[defective], candidates) / int(defective.sum())
        false_reject = _at_or_above(scores[~defective], candidates) / int((~defective).sum())
        if self.objective == "false_reject":
            best = _first(false_reject <= self.target + 1e-12, -recall, false_reject)
        elif self.objective == "recall":
            feasible = recall >= self.target - 1e-12
            for name in defect_types(types, defective) if self.per_type else []:
                of_type = torch.tensor([t == name for t in types]) & defective
                caught = _at_or_above(scores[of_type], candidates) / int(of_type.sum())
                feasible &= caught >= self.target - 1e-12
            best = _first(feasible, false_reject, -recall)
        else:
            share = (
                float(defective.float().mean()) if self.defect_rate is None else self.defect_rate
            )
            cost = self.escape_cost * share * (1 - recall) + (1 - share) * false_reject
            best = _first(
                torch.ones_like(cost, dtype=torch.bool), cost.round(decimals=12), false_reject
            )
        return _between(candidates, best)


def _between(candidates: torch.Tensor, best: int) -> float:
    """A threshold deciding the validation scores as candidate `best` does: halfway to the
    next lower score when a value of the scores' dtype lies strictly between, else `best`."""
    if best == 0 or best == len(candidates) - 1:
        return float(candidates[best])
    middle = (candidates[best] + candidates[best - 1]) / 2  # in the scores' own dtype
    return float(middle if candidates[best - 1] < middle < candidates[best] else candidates[best])


def _at_or_above(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """How many of `scores` each candidate threshold rejects (float64 counts)."""
    ordered = scores.sort().values
    return (len(ordered) - torch.searchsorted(ordered, candidates)).double()


def _first(feasible: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> int:
    """The feasible candidate with the smallest `first`, then `second`. One always is:
    rejecting nothing meets any false-reject cap, rejecting everything any recall floor."""
    order = np.lexsort((second.numpy(), first.numpy()))
    return int(order[feasible.numpy()[order]][0])
