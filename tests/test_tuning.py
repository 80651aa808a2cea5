"""Validation split, post-processing and the Optuna study: honest, recoverable, leak-free."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers.configs import ROOT, compose_config, train_command
from helpers.synthetic import make_category
from patchlab.artifacts.bank import BANK_FILE, read_banks
from patchlab.artifacts.run_files import TestOutputs
from patchlab.core.metrics import evaluate
from patchlab.errors import UserError
from patchlab.jobs.pipeline import run
from patchlab.tuning.postprocess import PostProcessing, binarize
from patchlab.tuning.split import stratified_split
from patchlab.tuning.study import SEARCH_SPACE, ThresholdTuning, Tuning
from patchlab.tuning.synthetic import cut_paste

TYPES = ["good"] * 10 + ["crack"] * 6 + ["hole"] * 5 + ["scratch"] * 2


def test_split_is_stratified_disjoint_and_seeded() -> None:
    validation, held_out = stratified_split(TYPES, 0.5, seed=3)
    assert set(validation.tolist()).isdisjoint(held_out.tolist())
    assert sorted(validation.tolist() + held_out.tolist()) == list(range(len(TYPES)))
    val_types = Counter(TYPES[i] for i in validation)
    test_types = Counter(TYPES[i] for i in held_out)
    assert val_types["good"] == 5 and val_types["crack"] == 3 and val_types["scratch"] == 1
    assert set(val_types) == set(test_types) == set(TYPES)
    again, _ = stratified_split(TYPES, 0.5, seed=3)
    other, _ = stratified_split(TYPES, 0.5, seed=4)
    assert again.tolist() == validation.tolist() and other.tolist() != validation.tolist()


def synthetic_outputs(speckle: bool, seed: int = 0) -> TestOutputs:
    """Scores on a full-resolution grid: defects in [0.6, 1], background in [0, 0.4].

    With `speckle`, single background pixels jump to defect level: noise only opening removes.
    """
    generator = torch.Generator().manual_seed(seed)
    count, size = len(TYPES), 32
    masks = torch.zeros(count, size, size, dtype=torch.uint8)
    for i, defect_type in enumerate(TYPES):
        if defect_type != "good":
            y, x = torch.randint(2, 20, (2,), generator=generator).tolist()
            masks[i, y : y + 8, x : x + 8] = 1
    scores = torch.rand(count, size, size, generator=generator) * 0.4
    scores = torch.where(
        masks.bool(), 0.6 + 0.4 * torch.rand(scores.shape, generator=generator), scores
    )
    if speckle:
        spots = torch.rand(scores.shape, generator=generator) < 0.01
        scores = torch.where(spots & ~masks.bool(), torch.ones_like(scores), scores)
    labels = (masks.flatten(1).amax(1) > 0).long()
    return TestOutputs(
        labels.float() + 0.1 * torch.rand(count, generator=generator),
        labels,
        scores,
        masks,
        scores.clone(),
        torch.ones(count, dtype=torch.bool),
        torch.ones(count, size, size, dtype=torch.bool),
    )


def tuning_config(storage: str, **space: dict) -> ThresholdTuning:
    """Only the threshold is searched (no re-blur, no morphology) unless `space` widens a knob."""
    fixed = {
        name: {"low": bound["low"], "high": bound["low"]} for name, bound in SEARCH_SPACE.items()
    }
    bounds = fixed | {"threshold": SEARCH_SPACE["threshold"], "sigma": {"low": 0.0, "high": 0.0}}
    bounds |= space
    return ThresholdTuning(n_trials=40, storage=storage, search_space=bounds)


def tune(config: ThresholdTuning, outputs: TestOutputs, name: str) -> Tuning:
    """What a run does: split, evaluate every part from one sort, tune on the validation part."""
    parts = config.split(TYPES)
    evaluation = evaluate(outputs.image_scores, outputs.labels, outputs.maps, outputs.masks, parts)
    return config.run(outputs, TYPES, evaluation, parts, 0.0, name)


def test_a_known_threshold_is_recovered(tmp_path: Path) -> None:
    outputs = synthetic_outputs(speckle=False)
    tuning = tune(tuning_config(f"sqlite:///{tmp_path}/optuna.db"), outputs, "known")
    post = tuning.post
    raw = post.low + post.threshold * (post.high - post.low)
    # Any threshold in the gap separates perfectly; the validation optimum sits at its top.
    assert 0.4 <= raw <= 0.61
    assert tuning.metrics["val_pixel_f1_tuned"] == pytest.approx(1.0)
    assert tuning.metrics["pixel_f1"] > 0.99
    assert tuning.metrics["val_pixel_f1_tuned"] >= tuning.metrics["val_pixel_f1_threshold_only"]


def test_opening_is_chosen_to_remove_speckle(tmp_path: Path) -> None:
    outputs = synthetic_outputs(speckle=True)
    config = tuning_config(f"sqlite:///{tmp_path}/optuna.db", open_radius={"low": 0, "high": 3})
    tuning = tune(config, outputs, "speckle")
    assert tuning.post.open_radius > 0
    assert (
        tuning.metrics["val_pixel_f1_tuned"] > tuning.metrics["val_pixel_f1_threshold_only"] + 0.05
    )


def test_study_reloads_from_sqlite(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    tuning = tune(tuning_config(storage), synthetic_outputs(False), "reload")
    loaded = optuna.load_study(study_name="reload", storage=storage)
    assert len(loaded.trials) == 40 and loaded.best_value == tuning.study.best_value
    assert loaded.best_params == tuning.study.best_params


def test_tuning_never_reads_the_held_out_part(tmp_path: Path) -> None:
    outputs = synthetic_outputs(speckle=True)
    config = tuning_config(None, open_radius={"low": 0, "high": 3})
    first = tune(config, outputs, "a")
    _, held_out = stratified_split(TYPES, 0.5, seed=0)
    poisoned = synthetic_outputs(speckle=True)
    poisoned.patch_scores[held_out] = torch.rand(len(held_out), 32, 32) * 100
    poisoned.maps[held_out] = torch.rand(len(held_out), 32, 32) * 100
    poisoned.masks[held_out] = 1 - poisoned.masks[held_out]
    poisoned.image_scores[held_out] = -poisoned.image_scores[held_out]
    second = tune(config, poisoned, "b")
    assert first.post == second.post and first.image_threshold == second.image_threshold
    assert first.metrics["pixel_f1"] != second.metrics["pixel_f1"]


def test_binarize_applies_morphology_and_min_area() -> None:
    maps = torch.zeros(1, 20, 20)
    maps[0, 2:10, 2:10] = 1.0
    maps[0, 15, 15] = 1.0
    post = PostProcessing(sigma=0.0, low=0.0, high=1.0, threshold=0.5)
    assert int(binarize(maps, post).sum()) == 65
    assert int(binarize(maps, PostProcessing(0.0, 0.0, 1.0, 0.5, open_radius=1)).sum()) == 64
    assert int(binarize(maps, PostProcessing(0.0, 0.0, 1.0, 0.5, min_area=2)).sum()) == 64


def test_threshold_optuna_in_a_run(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            f"data.root={synthetic_root}",
            "threshold=optuna",
            "threshold.n_trials=15",
            f"tracking.root={tmp_path}/mlruns",
        ]
    )
    run(cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("pixel_f1", "pixel_precision", "pixel_recall", "image_f1", "val_pixel_f1_tuned"):
        assert key in written and 0 <= written[key] <= 1
    assert written["val_pixel_f1_tuned"] >= written["val_pixel_f1_threshold_only"] - 1e-6
    travelling = json.loads(read_banks(tmp_path / "out" / BANK_FILE)[2]["extra"])
    assert set(travelling["post_processing"]) >= {"sigma", "threshold", "open_radius", "min_area"}
    assert (tmp_path / "out" / "tuning" / "optuna_history.png").stat().st_size > 5000
    assert (tmp_path / "mlruns" / "optuna.db").is_file()


def test_cut_paste_changes_exactly_the_masked_pixels() -> None:
    image = torch.rand(3, 40, 40)
    pasted, mask = cut_paste(image, torch.Generator().manual_seed(1))
    outside = mask == 0
    assert torch.equal(pasted[:, outside], image[:, outside])
    assert 0 < int(mask.sum()) < 40 * 40 // 5
    assert not torch.equal(pasted[:, ~outside], image[:, ~outside])


def test_synthetic_validation_needs_no_labelled_defects(
    synthetic_root: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            f"data.root={synthetic_root}",
            "threshold=optuna",
            "threshold.validation=synthetic",
            "threshold.synthetic_images=3",
            "threshold.n_trials=8",
            f"tracking.root={tmp_path}/mlruns",
        ]
    )
    metrics, detector, datamodule = run(cfg, tmp_path / "out")
    assert len(datamodule.holdout_samples) == 3 and len(datamodule.train_samples) == 5
    assert set(datamodule.holdout_samples).isdisjoint(datamodule.train_samples)
    assert detector.banks[0].shape[0] == int(5 * 8 * 8 * 0.25)
    assert metrics["val_images"] == 6 and metrics["held_out_images"] == 9
    assert 0 <= metrics["pixel_f1"] <= 1


@pytest.mark.slow
def test_model_selection_sweep_picks_by_validation_and_reports_held_out(tmp_path) -> None:
    """sweeps/model_selection.yaml as the docs run it, its grid swapped for a small one."""
    root = tmp_path / "parts"
    make_category(root, "gear", size=64, train=8, good=4, defects=4, seed=0)
    flags = ["-m", "--config-dir", "sweeps", "--config-name", "model_selection"]
    command = train_command(root, tmp_path, *flags, "category.name=gear", "geometry=seed")
    command += ["backbone.layers=[layer2,layer3]", "model.coreset_ratio=0.5"]
    command += ["model.blur_sigma=1,4,8", "threshold.n_trials=4", "data.geometry.resize=64"]
    command += ["data.geometry.crop_size=64"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "multirun"
    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}
    assert len(jobs) == 3
    best = max(sorted(jobs), key=lambda job: jobs[job]["val_pixel_auroc"])  # ties: first
    picked = pd.read_csv(sweep_dir / "selection.csv", index_col=0)
    assert picked.index[0] == best and picked.iloc[0]["picked"] == "yes"
    assert list(picked["val_pixel_auroc"]) == sorted(picked["val_pixel_auroc"], reverse=True)
    for column in ("held_out_pixel_auroc", "held_out_aupro", "pixel_f1"):
        assert picked.loc[best, column] == pytest.approx(jobs[best][column])
    summary = (sweep_dir / "summary.md").read_text()
    assert f"Picked **{best}**" in summary
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("patchcore").experiment_id], "tags.summary = 'true'"
    )
    assert parent.data.tags["selected_job"] == best
    assert parent.data.metrics["selected_held_out_pixel_auroc"] == pytest.approx(
        jobs[best]["held_out_pixel_auroc"]
    )


def test_one_test_image_per_defect_type_is_too_few_to_split(tmp_path) -> None:
    """A tiny own category: the split would leave validation empty. One line with the fix."""
    tuning = ThresholdTuning(storage=None)
    with pytest.raises(UserError, match=r"one part is empty: .*threshold.validation=synthetic"):
        tuning.split(["good", "scratch", "stain"])
    val, held_out = stratified_split(["good", "good", "scratch", "scratch"], 0.5, 0)
    assert val.dtype == held_out.dtype == torch.long and len(val) == len(held_out) == 2
