"""Optuna tunes blur, threshold and morphology on the validation part; the held-out part scores it.

Anomaly maps are never recomputed from images: trials start from the cached patch-score grids,
so a trial costs only the post-processing. Without masks (image-only data) only the image
threshold is tuned: there is no pixel study and no post-processing.
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from patchlab.lightning_module import TestOutputs
from patchlab.metrics import f1_max
from patchlab.tracking import log_metrics, log_params
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at, pixel_scores
from patchlab.tuning.split import stratified_split


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


def _subset(outputs: TestOutputs, index: torch.Tensor) -> TestOutputs:
    return TestOutputs(
        **{name: getattr(outputs, name)[index] for name in TestOutputs.__dataclass_fields__}
    )


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


def suggest(trial: optuna.Trial, space: DictConfig) -> dict[str, float]:
    """One value per search-space entry; integer bounds in the YAML make an integer knob."""
    params = {}
    for name, bounds in space.items():
        integer = isinstance(bounds.low, int) and isinstance(bounds.high, int)
        draw = trial.suggest_int if integer else trial.suggest_float
        params[name] = draw(name, bounds.low, bounds.high)
    return params


def _objective(validation: TestOutputs, space: DictConfig):
    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        maps = maps_at(validation, params["sigma"])
        predicted = binarize(maps, normalised(maps, **params))
        return pixel_scores(predicted, validation.masks)["pixel_f1"]

    return objective


def tune(
    validation: TestOutputs, config: DictConfig, baseline_sigma: float, storage: str, name: str
) -> tuple[optuna.Study, PostProcessing, float]:
    """Runs the study on validation data only; returns it, the best post-processing and the
    threshold-only baseline F1 (which the study is seeded with, so it can only match or beat it)."""
    space = OmegaConf.load(config.search_space)
    baseline, baseline_f1 = threshold_only(validation, baseline_sigma)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
    )
    # The threshold-only optimum, in the search space's own terms (morphology off).
    study.enqueue_trial({name: getattr(baseline, name) for name in space})
    study.optimize(_objective(validation, space), n_trials=config.n_trials, show_progress_bar=True)
    best = normalised(maps_at(validation, study.best_params["sigma"]), **study.best_params)
    return study, best, baseline_f1


def run_tuning(
    outputs: TestOutputs,
    defect_types: list[str],
    config: DictConfig,
    baseline_sigma: float,
    storage: str,
    name: str,
    validation: TestOutputs | None = None,
) -> Tuning:
    """Tunes on a validation set and reports honest figures on images it never saw.

    Without `validation`, the test set is split (stratified) and its other part is held out;
    with one (e.g. synthetic anomalies on held-back good images) the whole test set is.
    Pixel figures appear only for parts with masks.
    """
    if validation is None:
        val_index, test_index = stratified_split(defect_types, config.val_fraction, config.seed)
        validation, held_out = _subset(outputs, val_index), _subset(outputs, test_index)
    else:
        held_out = outputs
    study, post, metrics = None, None, {}
    if validation.pixel_labelled:
        study, post, baseline_f1 = tune(validation, config, baseline_sigma, storage, name)
        metrics = {
            "val_pixel_f1_tuned": study.best_value,
            "val_pixel_f1_threshold_only": baseline_f1,
        }
        if held_out.pixel_labelled:
            predicted = binarize(maps_at(held_out, post.sigma), post)
            metrics |= pixel_scores(predicted, held_out.masks)
    _, image_threshold = f1_max(validation.image_scores, validation.labels)
    decisions = pixel_scores(held_out.image_scores >= image_threshold, held_out.labels)
    metrics |= {
        "image_f1": decisions["pixel_f1"],
        "val_images": float(len(validation.labels)),
        "held_out_images": float(len(held_out.labels)),
    }
    return Tuning(post, image_threshold, metrics, study)


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


def tune_and_log(
    cfg: DictConfig,
    outputs: TestOutputs,
    defect_types: list[str],
    output_dir: Path,
    param_prefix: str = "tuned",
    validation: TestOutputs | None = None,
) -> Tuning:
    """Tunes, writes tuning.json and the study plots, and logs both to the active MLflow run.

    MLflow params cannot change once logged, so a re-tune logs under its own `param_prefix`.
    """
    storage = str(cfg.threshold.storage)
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not Path(cfg.threshold.search_space).is_file():
        raise FileNotFoundError(
            f"threshold.search_space: no such file {cfg.threshold.search_space}"
        )
    tuning = run_tuning(
        outputs,
        defect_types,
        cfg.threshold,
        cfg.model.blur_sigma,
        storage,
        name=f"{cfg.category.name}:{output_dir.resolve()}",
        validation=validation,
    )
    (output_dir / "tuning.json").write_text(json.dumps(_summary(tuning, storage), indent=2))
    if tuning.study is not None:
        save_plots(tuning.study, output_dir / "tuning")
    params = tuning.travelling().get("post_processing", {})
    params |= {"image_threshold": tuning.image_threshold}
    log_params({f"{param_prefix}.{k}": v for k, v in params.items()})
    log_metrics(tuning.metrics)
    return tuning


def _summary(tuning: Tuning, storage: str) -> dict:
    """tuning.json: what travels with the bank, the metrics, and where the study is (if any)."""
    summary = {**tuning.travelling(), "metrics": tuning.metrics}
    if tuning.study is not None:
        summary |= {"study": tuning.study.study_name, "storage": storage}
    return summary
