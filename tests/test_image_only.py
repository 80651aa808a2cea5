"""Image-level labels only: no ground_truth/, or a plain folder layout without masks."""

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers.configs import compose_config, tracked
from helpers.synthetic import make_category, make_folder_layout
from patchlab.artifacts.bank import BANK_FILE, read_banks
from patchlab.artifacts.run_files import TestOutputs, load_outputs, save_outputs
from patchlab.deploy.predict import main as predict_main
from patchlab.errors import UserError
from patchlab.jobs.pipeline import run
from patchlab.reporting.render import load_run, render_run

PIXEL_KEYS = {"pixel_auroc", "pixel_f1_max", "pixel_f1_max_threshold", "aupro"}
TUNED_PIXEL_KEYS = {
    "pixel_f1",
    "pixel_precision",
    "pixel_recall",
    "val_pixel_f1_tuned",
    "val_pixel_f1_threshold_only",
}
FIGURES = {
    "score_distributions.png",
    "operating_characteristic.png",
    "roc_curves.png",
    "pr_curve.png",
    "failure_cases.png",
}


@pytest.fixture(scope="module")
def image_only_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image_only")
    shutil.rmtree(make_category(root, "nomask", seed=2) / "ground_truth")
    return root


def mlflow_metrics(store: Path) -> set[str]:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("patchcore")
    (found,) = client.search_runs([experiment.experiment_id])
    return set(found.data.metrics)


def check_image_only(out: Path, metrics: dict[str, float]) -> None:
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx(metrics) and 0 <= written["image_auroc"] <= 1
    assert not (PIXEL_KEYS | TUNED_PIXEL_KEYS) & set(written)
    assert len(list((out / "heatmaps").glob("*.png"))) == 8
    assert {p.name for p in (out / "figures").glob("*.png")} == FIGURES


def test_no_ground_truth_runs_image_only(image_only_root: Path, tmp_path: Path, caplog) -> None:
    store = tmp_path / "mlruns"
    overrides = [f"data.root={image_only_root}", "category.name=nomask", f"tracking.root={store}"]
    with caplog.at_level(logging.INFO):
        metrics = tracked(overrides, tmp_path / "out")
    check_image_only(tmp_path / "out", metrics)
    assert metrics["image_auroc"] > 0.6
    assert "image_auroc" in mlflow_metrics(store)
    assert not PIXEL_KEYS & mlflow_metrics(store)
    (line,) = [r.message for r in caplog.records if "pixel metrics skipped" in r.message]
    assert "nomask: no ground_truth/ folder" in line and "image-only mode" in line


def test_image_only_tunes_the_image_threshold(image_only_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "mlruns"
    overrides = [
        f"data.root={image_only_root}",
        "category.name=nomask",
        "threshold=optuna",
        "threshold.n_trials=5",
        f"tracking.root={store}",
    ]
    metrics = tracked(overrides, tmp_path / "out")
    out = tmp_path / "out"
    check_image_only(out, metrics)
    assert 0 <= metrics["image_f1"] <= 1 and metrics["held_out_images"] == 3
    assert not TUNED_PIXEL_KEYS & mlflow_metrics(store)
    tuning = json.loads((out / "tuning.json").read_text())
    assert set(tuning) == {"image_threshold", "operating_point", "objective", "metrics"}
    assert json.loads(read_banks(out / BANK_FILE)[2]["extra"]) == {
        "image_threshold": tuning["image_threshold"],
        "operating_point": "f1",
        "thresholds_from": "validation (threshold=optuna)",
    }
    assert not (out / "tuning").exists()
    # Predicting with it gives image decisions and maps, and no masks: nothing set a pixel
    # threshold.
    predict_main([str(out), str(image_only_root / "nomask" / "test"), "--out", str(tmp_path / "p")])
    with (tmp_path / "p" / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 9 and all(row["defect_area_px"] == "" for row in rows)
    assert not (tmp_path / "p" / "masks").exists() and (tmp_path / "p" / "maps").is_dir()
    for path in (out / "heatmaps").iterdir():
        os.remove(path)
    render_run(out, *load_run(out))
    assert len(list((out / "heatmaps").glob("*.png"))) == 8


def test_folder_layout_without_masks(tmp_path: Path) -> None:
    root = make_folder_layout(tmp_path / "my_part", normal=10, abnormal=4)
    config = compose_config(
        ["data=folder", f"data.root={root}", "data.normal_split=0.3", "category.name=my_part"]
    )
    metrics, _, datamodule = run(config, tmp_path / "out")
    assert len(datamodule.train_samples) == 7 and len(datamodule.test_samples) == 7
    assert metrics["image_auroc"] > 0.6 and not PIXEL_KEYS & set(metrics)
    assert len(list((tmp_path / "out" / "heatmaps").glob("*.png"))) == 7


@pytest.mark.real_data
def test_folder_layout_from_real_bottle(real_data_root: Path, tmp_path: Path) -> None:
    """A few bottle images rearranged as a team would bring them, masks named `<stem>.png`."""
    bottle, root = real_data_root / "bottle", tmp_path / "bottle_parts"
    picks = {
        "train": sorted((bottle / "train" / "good").iterdir())[:20],
        "test_good": sorted((bottle / "test" / "good").iterdir())[:5],
        "defect": sorted((bottle / "test" / "broken_large").iterdir())[:5],
    }
    for folder, paths in picks.items():
        (root / folder).mkdir(parents=True)
        for path in paths:
            (root / folder / path.name).symlink_to(path)
    (root / "masks").mkdir()
    for path in picks["defect"]:
        mask = bottle / "ground_truth" / "broken_large" / f"{path.stem}_mask.png"
        (root / "masks" / path.name).symlink_to(mask)
    config = compose_config(
        [
            "data=folder",
            f"data.root={root}",
            "data.normal_dir=train",
            "data.abnormal_dir=defect",
            "data.mask_dir=masks",
            "data.normal_test_dir=test_good",
            "category.name=bottle_parts",
            "backbone=efficientnet_lite2",
            "data.geometry.resize=256",
            "data.geometry.crop_size=224",
            "model.coreset_ratio=0.01",
        ]
    )
    metrics, _, datamodule = run(config, tmp_path / "out")
    assert len(datamodule.train_samples) == 20 and len(datamodule.test_samples) == 10
    assert metrics["image_auroc"] >= 0.95 and metrics["pixel_auroc"] >= 0.9, metrics
    assert (tmp_path / "out" / "figures" / "pr_curve.png").is_file()


def test_image_only_with_synthetic_validation_still_tunes_masks(
    image_only_root: Path, tmp_path: Path
) -> None:
    """CutPaste validation has masks, so post-processing is tuned; the test set has none."""
    overrides = [
        f"data.root={image_only_root}",
        "category.name=nomask",
        "threshold=optuna",
        "threshold.validation=synthetic",
        "threshold.synthetic_images=3",
        "threshold.n_trials=5",
        "tracking.enabled=false",
        f"tracking.root={tmp_path}/mlruns",
    ]
    metrics, _, _ = run(compose_config(overrides), tmp_path / "out")
    assert "val_pixel_f1_tuned" in metrics and "image_f1" in metrics
    assert not (PIXEL_KEYS | {"pixel_f1", "pixel_precision", "pixel_recall"}) & set(metrics)
    assert "post_processing" in json.loads((tmp_path / "out" / "tuning.json").read_text())


def test_mask_known_round_trips(tmp_path: Path) -> None:
    columns = {
        "image_scores": torch.rand(3),
        "labels": torch.tensor([0, 1, 1]),
        "maps": torch.rand(3, 8, 8),
        "masks": torch.zeros(3, 8, 8, dtype=torch.uint8),
        "patch_scores": torch.rand(3, 2, 2),
    }
    known = torch.tensor([True, False, False])
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    save_outputs(
        TestOutputs(**columns, mask_known=known, valid=valid), tmp_path / "new.safetensors"
    )
    loaded = load_outputs(tmp_path / "new.safetensors")
    assert torch.equal(loaded.mask_known, known) and not loaded.pixel_labelled


@pytest.mark.parametrize("metric", ["val_pixel_auroc", "aupro"])
def test_a_pixel_selection_metric_without_masks_is_refused_before_any_work(
    image_only_root: Path, tmp_path: Path, metric: str
) -> None:
    """+preset=quality selects by val_pixel_auroc: on image labels alone it would train, test
    and tune, then fail at the end. It stops at once with the image metric to use."""
    overrides = [
        f"data.root={image_only_root}",
        "category.name=nomask",
        "threshold=optuna",
        f"optimized_metric={metric}",
    ]
    image = "val_image_auroc" if metric.startswith("val_") else "image_auroc"
    wanted = rf"^optimized_metric={metric} needs pixel masks, .*optimized_metric={image}$"
    with pytest.raises(UserError, match=wanted) as info:
        run(compose_config(overrides), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]
