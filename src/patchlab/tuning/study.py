"""Optuna tunes blur, threshold and morphology on the validation part; the held-out part scores it.

Anomaly maps are never recomputed from images: trials start from the cached patch-score grids,
so a trial costs only the post-processing. Without masks (image-only data) only the image
threshold is tuned: there is no pixel study and no post-processing. Nothing here writes files
or talks to MLflow: the run's job does, with what `run` returns.
"""

import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from patchlab.core.metrics import (
    Evaluation,
    evaluate_outputs,
    precision_recall_f1,
    prefixed,
)
from patchlab.core.outputs import TestOutputs
from patchlab.core.ranking import ALL, RankedCounts, rank
from patchlab.errors import SettingError, UserError, check_limits
from patchlab.tuning.operating_point import OperatingPoint
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at, value_range
from patchlab.tuning.rates import (
    Rate,
    decision_rates,
    defect_types,
    metric_name,
    rate_metrics,
)
from patchlab.tuning.split import stratified_split

# threshold is on maps normalised to the validation maps' [min, max]; radii and areas in
# pixels. Integer bounds make an integer knob.
SEARCH_SPACE = {
    "threshold": {"low": 0.0, "high": 1.0},
    "sigma": {"low": 1.0, "high": 8.0},
    "open_radius": {"low": 0, "high": 4},
    "close_radius": {"low": 0, "high": 6},
    "min_area": {"low": 0, "high": 500},
}


RATE_WORDS = {"false_reject_rate": "false-reject rate"}


@dataclass
class Tuning:
    """What tuning found on validation data and what it scored on the held-out part.

    `post` and `study` are None when the validation images have no masks.
    """

    post: PostProcessing | None
    image_threshold: float
    metrics: dict[str, float]
    study: optuna.Study | None
    point: OperatingPoint = field(default_factory=OperatingPoint)
    rates: dict[str, dict[str, Rate]] = field(default_factory=dict)  # "val", "held_out"

    def travelling(self) -> dict:
        """What scoring new images needs, stored in the bank file's metadata."""
        post = {} if self.post is None else {"post_processing": self.post.as_dict()}
        return post | {"image_threshold": self.image_threshold, "operating_point": self.label}

    @property
    def label(self) -> str:
        return self.point.label()

    def params(self) -> dict[str, float | str]:
        """The tuned values, flat, as MLflow params."""
        post = self.post.as_dict() if self.post is not None else {}
        return post | {"image_threshold": self.image_threshold, "operating_point": self.label}

    def summary(self, storage: str | None) -> dict:
        """tuning.json: the decisions, the rates they give, the metrics, and the study."""
        study = {} if self.study is None else {"study": self.study.study_name, "storage": storage}
        rates = {
            part: {name: rate.metrics("rate") | {"hits": rate.hits} for name, rate in found.items()}
            for part, found in self.rates.items()
        }
        point = vars(self.point) | {"label": self.label, "rates": rates}
        return {**self.travelling(), "objective": point, "metrics": self.metrics, **study}

    def lines(self) -> list[str]:
        """What the run prints about its operating point: every deciding rate with its 95%
        interval, the targeted one beside its target; per defect type on the held-out part."""
        lines = [f"Operating point {self.label}: image threshold {self.image_threshold:.6g}"]
        for part, words in (("val", "validation"), ("held_out", "held-out")):
            for name, rate in self.rates.get(part, {}).items():
                if "/" in name and part == "val":
                    continue
                what = RATE_WORDS.get(name) or name.replace("/", " of ")
                held = name in self.rates.get("val", {})  # a type validation never saw: no target
                note = self.point.target_note(name) if held else ""
                lines.append(rate.line(f"{words} {what}") + note)
        return lines + self.point.unconfirmed(self.rates.get("held_out", {}))


def normalised(maps: torch.Tensor, sigma: float, threshold: float, **params: int) -> PostProcessing:
    """Post-processing whose 0..1 threshold scale spans these (validation) maps."""
    low, high = value_range(maps)
    return PostProcessing(sigma=sigma, low=low, high=high, threshold=threshold, **params)


def threshold_only(ranked: RankedCounts, sigma: float) -> tuple[PostProcessing, float]:
    """The exact F1-optimal threshold from the validation maps' ranking (maps at `sigma`)."""
    f1, raw = ranked.f1_max()
    low, high = float(ranked.thresholds[-1]), float(ranked.thresholds[0])
    threshold = (raw - low) / max(high - low, 1e-12)
    return PostProcessing(sigma=sigma, low=low, high=high, threshold=threshold), f1


def suggest(trial: optuna.Trial, space: Mapping) -> dict[str, float]:
    """One value per search-space entry; integer bounds make an integer knob."""
    params = {}
    for name, bounds in space.items():
        integer = isinstance(bounds["low"], int) and isinstance(bounds["high"], int)
        draw = trial.suggest_int if integer else trial.suggest_float
        params[name] = draw(name, bounds["low"], bounds["high"])
    return params


def _objective(validation: TestOutputs, space: Mapping):
    truth = validation.masks.bool()  # once, not per trial

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        maps = maps_at(validation, params["sigma"])
        predicted = binarize(maps, normalised(maps, **params))
        return precision_recall_f1(predicted, truth)["f1"]

    return objective


def _prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in scores.items()}


@dataclass
class ThresholdTuning:
    """`threshold=optuna`: how the pixel and image thresholds are tuned, built from its config.

    Args:
        validation: "test_split" tunes on a stratified part of the labelled test set and
            reports on the rest; "synthetic" holds `synthetic_images` train/good images back
            from the bank, tunes on them and their CutPaste copies, and reports on the whole
            test set (for parts with no labelled defects).
        synthetic_images: Good images held back for "synthetic".
        val_fraction: Share of each defect type tuned on, for "test_split".
        seed: Seeds the split and Optuna's sampler.
        n_trials: Optuna trials; the first is always the threshold-only optimum.
        storage: Optuna storage URL, so studies can be reloaded; None keeps them in memory.
        resume: Continue the study of the same name (category and output folder) with
            `n_trials` more; otherwise a run replaces it, so the same command into the same
            folder gives the same result.
        search_space: `{knob: {low, high}}` over PostProcessing's fields, `sigma` included.
        operating_point: How the image threshold is chosen (`OperatingPoint`'s fields).
    """

    LIMITS: ClassVar = {  # a literal for the preflight (see errors.check_limits)
        "validation": [("in", ["test_split", "synthetic"])],
        "synthetic_images": [(">=", 1)],
        "val_fraction": [(">", 0), ("<", 1)],
        "n_trials": [(">=", 1)],
    }
    validation: str = "test_split"
    synthetic_images: int = 20
    val_fraction: float = 0.5
    seed: int = 0
    n_trials: int = 100
    storage: str | None = None
    resume: bool = False
    search_space: Mapping = field(default_factory=lambda: json.loads(json.dumps(SEARCH_SPACE)))
    operating_point: Mapping | OperatingPoint = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.search_space, DictConfig):
            self.search_space = OmegaConf.to_container(self.search_space, resolve=True)
        if not isinstance(self.operating_point, OperatingPoint):
            self.operating_point = OperatingPoint.of(dict(self.operating_point))
        check_limits(self.LIMITS, vars(self))
        unknown = set(self.search_space) - set(SEARCH_SPACE)
        if unknown or "sigma" not in self.search_space:
            raise SettingError(
                f"{{search_space}} knobs must be among {list(SEARCH_SPACE)} and include sigma; "
                f"got {list(self.search_space)}"
            )

    @property
    def holdout_images(self) -> int:
        """Good images to hold back from the bank: only synthetic validation needs them."""
        return self.synthetic_images if self.validation == "synthetic" else 0

    def split(self, defect_types: list[str]) -> dict[str, torch.Tensor]:
        """The test set's validation and held-out parts (image indices), stratified by defect
        type; none for synthetic validation, which holds out the whole test set."""
        if self.validation == "synthetic":
            return {}
        val, held_out = stratified_split(defect_types, self.val_fraction, self.seed)
        if not len(val) or not len(held_out):
            counts = {t: defect_types.count(t) for t in sorted(set(defect_types))}
            raise UserError(
                f"threshold=optuna splits the test set into validation and held-out images, "
                f"but with {counts} images per type one part is empty: give a defect type at "
                "least two test images, or use threshold.validation=synthetic"
            )
        return {"val": val, "held_out": held_out}

    def study(self, validation: TestOutputs, baseline: RankedCounts, sigma: float, name: str):
        """Runs the study on validation data only; returns it, the best post-processing and the
        threshold-only baseline F1 (which the study is seeded with, so it can only match or
        beat it). `baseline` ranks the validation maps at `sigma`."""
        start, baseline_f1 = threshold_only(baseline, sigma)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.storage and self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.storage and not self.resume:  # a run into the same folder replaces its study
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=name, storage=self.storage)
        study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=self.seed),
        )
        # The threshold-only optimum, in the search space's own terms (morphology off).
        study.enqueue_trial({knob: getattr(start, knob) for knob in self.search_space})
        study.optimize(
            _objective(validation, self.search_space),
            n_trials=self.n_trials,
            show_progress_bar=True,
        )
        best = normalised(maps_at(validation, study.best_params["sigma"]), **study.best_params)
        return study, best, baseline_f1

    def run(
        self,
        outputs: TestOutputs,
        types: list[str],
        evaluation: Evaluation,
        parts: dict[str, torch.Tensor],
        sigma: float,
        name: str,
        synthetic: TestOutputs | None = None,
    ) -> Tuning:
        """Tunes on validation images and reports honest figures on images it never saw.

        `types` are the test images' defect types. `evaluation` holds the test set's metrics
        and rankings, for its `parts` (`split`) too; its maps are at `sigma`. With `synthetic`
        validation (CutPaste copies of held-back good images, typed "synthetic") the whole
        test set is held out. Pixel figures appear only for parts with masks.
        """
        if synthetic is None:
            validation = outputs.subset(parts["val"])
            held_out = outputs.subset(parts["held_out"])
            val_types = [types[i] for i in parts["val"].tolist()]
            held_types = [types[i] for i in parts["held_out"].tolist()]
            ranked, metrics = evaluation.pixel.get("val"), {}
        else:
            validation, held_out, held_types = synthetic, outputs, types
            val_types = ["good" if not label else "synthetic" for label in synthetic.labels]
            found = evaluate_outputs(synthetic)
            ranked = found.pixel.get(ALL)
            metrics = prefixed("val", found.metrics) | prefixed("held_out", evaluation.metrics)
        defective = int(validation.labels.sum())
        if not 0 < defective < len(validation.labels):
            raise UserError(
                f"threshold=optuna chooses thresholds on validation images, but its "
                f"{len(validation.labels)} have {defective} defective: the test set needs good "
                "and defective images, two or more of each type (threshold.val_fraction splits "
                "them), or tune on threshold.validation=synthetic"
            )
        study, post = None, None
        if validation.pixel_labelled:
            ranked = ranked or rank(validation.maps, validation.masks, validation.valid)
            study, post, baseline_f1 = self.study(validation, ranked, sigma, name)
            metrics |= {
                "val_pixel_f1_tuned": study.best_value,
                "val_pixel_f1_threshold_only": baseline_f1,
            }
            if held_out.pixel_labelled:
                predicted = binarize(maps_at(held_out, post.sigma), post)
                metrics |= _prefixed("pixel", precision_recall_f1(predicted, held_out.masks))
                metrics |= defect_pixels_found(predicted, held_out, held_types)
        point = self.operating_point
        image_threshold = point.choose(validation.image_scores, validation.labels, val_types)
        rates = {
            "val": decision_rates(
                validation.image_scores, validation.labels, val_types, image_threshold
            ),
            "held_out": decision_rates(
                held_out.image_scores, held_out.labels, held_types, image_threshold
            ),
        }
        decisions = held_out.image_scores >= image_threshold
        metrics |= {
            "image_f1": precision_recall_f1(decisions, held_out.labels)["f1"],
            "image_threshold": image_threshold,
            "val_images": float(len(validation.labels)),
            "held_out_images": float(len(held_out.labels)),
        }
        metrics |= rate_metrics("val", rates["val"]) | rate_metrics("held_out", rates["held_out"])
        return Tuning(post, image_threshold, metrics, study, point, rates)


def defect_pixels_found(predicted: torch.Tensor, outputs: TestOutputs, types: list[str]) -> dict:
    """The share of each defect type's defect pixels inside the predicted masks, as
    `held_out_defect_pixels_found/<type>`: how much of a crack the mask shows."""
    truth = outputs.masks.bool()
    found = {}
    for name in defect_types(types, outputs.labels.bool()):
        of_type = torch.tensor([t == name for t in types])
        defect_pixels = int(truth[of_type].sum())
        hits = int((predicted[of_type] & truth[of_type]).sum())
        found[metric_name(f"held_out_defect_pixels_found/{name}")] = (
            hits / defect_pixels if defect_pixels else math.nan
        )
    return found
