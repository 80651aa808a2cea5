"""Optuna tunes blur, threshold and morphology on the validation part; the held-out part scores it.

Anomaly maps are never recomputed from images: trials start from the cached patch-score grids,
so a trial costs only the post-processing. Without masks (image-only data) only the image
threshold is tuned: there is no pixel study and no post-processing.
"""

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from patchlab.core.metrics import evaluate, f1_max, precision_recall_f1
from patchlab.errors import SettingError
from patchlab.outputs import TUNING_FILE, TestOutputs
from patchlab.tracking.runs import log_metrics, log_params
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at
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
VALIDATIONS = ("test_split", "synthetic")


@dataclass
class Tuning:
    """What tuning found on validation data and what it scored on the held-out part.

    `post` and `study` are None when the validation images have no masks.
    """

    post: PostProcessing | None
    image_threshold: float
    metrics: dict[str, float]
    study: optuna.Study | None

    def travelling(self) -> dict:
        """What scoring new images needs, stored in the bank file's metadata."""
        post = {} if self.post is None else {"post_processing": self.post.as_dict()}
        return post | {"image_threshold": self.image_threshold}


def normalised(maps: torch.Tensor, sigma: float, threshold: float, **params: int) -> PostProcessing:
    """Post-processing whose 0..1 threshold scale spans these (validation) maps."""
    low, high = float(maps.min()), float(maps.max())
    return PostProcessing(sigma=sigma, low=low, high=high, threshold=threshold, **params)


def threshold_only(outputs: TestOutputs, sigma: float) -> tuple[PostProcessing, float]:
    """The exact F1-optimal threshold from the validation precision-recall curve."""
    maps = maps_at(outputs, sigma)
    f1, raw = f1_max(maps, outputs.masks)
    low, high = float(maps.min()), float(maps.max())
    return normalised(maps, sigma, (raw - low) / max(high - low, 1e-12)), f1


def suggest(trial: optuna.Trial, space: Mapping) -> dict[str, float]:
    """One value per search-space entry; integer bounds make an integer knob."""
    params = {}
    for name, bounds in space.items():
        integer = isinstance(bounds["low"], int) and isinstance(bounds["high"], int)
        draw = trial.suggest_int if integer else trial.suggest_float
        params[name] = draw(name, bounds["low"], bounds["high"])
    return params


def _objective(validation: TestOutputs, space: Mapping):
    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        maps = maps_at(validation, params["sigma"])
        predicted = binarize(maps, normalised(maps, **params))
        return precision_recall_f1(predicted, validation.masks)["f1"]

    return objective


def split_metrics(prefix: str, part: TestOutputs) -> dict[str, float]:
    """Threshold-free metrics of one part of the split, named `<prefix>_<metric>`.

    Model selection reads the `val_` ones; the `held_out_` ones report what was chosen on
    images no choice has seen.
    """
    masks = part.masks if part.pixel_labelled else None
    found = evaluate(part.image_scores, part.labels, part.maps, masks)
    return _prefixed(prefix, {k: v for k, v in found.items() if not k.endswith("_threshold")})


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
        search_space: `{knob: {low, high}}` over PostProcessing's fields, `sigma` included.
    """

    validation: str = "test_split"
    synthetic_images: int = 20
    val_fraction: float = 0.5
    seed: int = 0
    n_trials: int = 100
    storage: str | None = None
    search_space: Mapping = field(default_factory=lambda: json.loads(json.dumps(SEARCH_SPACE)))

    def __post_init__(self) -> None:
        if isinstance(self.search_space, DictConfig):
            self.search_space = OmegaConf.to_container(self.search_space, resolve=True)
        if self.validation not in VALIDATIONS:
            raise SettingError(
                f"{{validation}} must be one of {list(VALIDATIONS)}, got {self.validation!r}"
            )
        if not 0 < self.val_fraction < 1:
            raise SettingError(f"{{val_fraction}} must be in (0, 1), got {self.val_fraction}")
        if self.n_trials < 1:
            raise SettingError(f"{{n_trials}} must be >= 1, got {self.n_trials}")
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

    def study(self, validation: TestOutputs, baseline_sigma: float, name: str):
        """Runs the study on validation data only; returns it, the best post-processing and the
        threshold-only baseline F1 (which the study is seeded with, so it can only match or
        beat it)."""
        baseline, baseline_f1 = threshold_only(validation, baseline_sigma)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.storage and self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=self.seed),
        )
        # The threshold-only optimum, in the search space's own terms (morphology off).
        study.enqueue_trial({knob: getattr(baseline, knob) for knob in self.search_space})
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
        defect_types: list[str],
        baseline_sigma: float,
        name: str,
        validation: TestOutputs | None = None,
    ) -> Tuning:
        """Tunes on a validation set and reports honest figures on images it never saw.

        Without `validation`, the test set is split (stratified) and its other part is held
        out; with one (e.g. synthetic anomalies on held-back good images) the whole test set
        is. Pixel figures appear only for parts with masks.
        """
        if validation is None:
            val_index, test_index = stratified_split(defect_types, self.val_fraction, self.seed)
            validation, held_out = outputs.subset(val_index), outputs.subset(test_index)
        else:
            held_out = outputs
        study, post, metrics = None, None, {}
        if validation.pixel_labelled:
            study, post, baseline_f1 = self.study(validation, baseline_sigma, name)
            metrics = {
                "val_pixel_f1_tuned": study.best_value,
                "val_pixel_f1_threshold_only": baseline_f1,
            }
            if held_out.pixel_labelled:
                predicted = binarize(maps_at(held_out, post.sigma), post)
                metrics |= _prefixed("pixel", precision_recall_f1(predicted, held_out.masks))
        _, image_threshold = f1_max(validation.image_scores, validation.labels)
        decisions = held_out.image_scores >= image_threshold
        metrics |= split_metrics("val", validation) | split_metrics("held_out", held_out)
        metrics |= {
            "image_f1": precision_recall_f1(decisions, held_out.labels)["f1"],
            "val_images": float(len(validation.labels)),
            "held_out_images": float(len(held_out.labels)),
        }
        return Tuning(post, image_threshold, metrics, study)

    def run_and_log(
        self,
        outputs: TestOutputs,
        defect_types: list[str],
        output_dir: Path,
        baseline_sigma: float,
        name: str,
        param_prefix: str = "tuned",
        validation: TestOutputs | None = None,
    ) -> Tuning:
        """Tunes, writes tuning.json and the study plots, and logs both to the active MLflow
        run. MLflow params cannot change once logged, so a re-tune logs under its own
        `param_prefix`."""
        tuning = self.run(outputs, defect_types, baseline_sigma, name, validation)
        summary = {**tuning.travelling(), "metrics": tuning.metrics}
        if tuning.study is not None:
            summary |= {"study": tuning.study.study_name, "storage": self.storage}
            save_plots(tuning.study, output_dir / "tuning")
        (output_dir / TUNING_FILE).write_text(json.dumps(summary, indent=2))
        params = tuning.travelling().get("post_processing", {})
        params |= {"image_threshold": tuning.image_threshold}
        log_params({f"{param_prefix}.{k}": v for k, v in params.items()})
        log_metrics(tuning.metrics)
        return tuning


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNGs."""
    import matplotlib
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    # Optuna's plots switch matplotlib to its ggplot style globally; rc_context undoes that so
    # every later figure looks the same whether or not tuning ran before it.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in (
            ("optuna_history.png", plots.plot_optimization_history),
            ("optuna_importances.png", plots.plot_param_importances),
        ):
            axis = plot(study)
            axis.figure.savefig(folder / name, dpi=90, bbox_inches="tight")
            pyplot.close(axis.figure)
            paths.append(folder / name)
    return paths
