"""Backbone ensembles: normal statistics, combined maps and scores, banks per member."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from helpers.configs import ROOT, compose_config
from patchlab.artifacts.bank import BANK_FILE, read_banks
from patchlab.artifacts.run_files import OUTPUTS_FILE, load_outputs
from patchlab.core.backbones import create_ensemble
from patchlab.core.ensemble import combine_grids, normal_statistics, standardised
from patchlab.core.search import ExactIndex
from patchlab.data.mvtec import read_image
from patchlab.deploy.export import export
from patchlab.deploy.loading import load_detector, load_predictor
from patchlab.deploy.predict import main as predict_main
from patchlab.jobs.build import build_detector
from patchlab.jobs.pipeline import run


def tiny_ensemble(cfg: DictConfig) -> DictConfig:
    """Two random-init ResNet-18 members on different grids (stride 4 and 8)."""
    cfg.backbone = OmegaConf.create(
        {
            "_target_": "patchlab.core.backbones.create_ensemble",
            "name": "tiny_ensemble",
            "layers": ["layer1", "layer2"],
            "members": [
                {"name": "resnet18", "pretrained": False},
                {"name": "resnet18", "pretrained": False, "layers": ["layer2", "layer3"]},
            ],
        }
    )
    return cfg


def test_normal_statistics_are_leave_one_out_distances() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=generator)
    selected = torch.arange(0, 200, 2)  # every other patch in the bank
    index = ExactIndex()
    index.fit(features[selected])
    mean, std = normal_statistics(features, selected, index, torch.Generator(), sample=200)
    distances = torch.cdist(features, features[selected])
    own = torch.zeros(200, dtype=torch.bool)
    own[selected] = True
    distances[selected, torch.arange(100)] = float("inf")  # a bank patch may not find itself
    nearest = distances.min(1).values
    assert mean == pytest.approx(float(nearest.mean()), rel=1e-5)
    assert std == pytest.approx(float(nearest.std(correction=0)), rel=1e-4)
    assert float(nearest[own].min()) > 0  # every bank patch was measured to another one


def test_standardised_grids_of_different_sizes_average_on_the_finest() -> None:
    fine = torch.full((2, 8, 8), 3.0)
    coarse = torch.full((2, 4, 4), 10.0)
    combined = combine_grids([standardised(fine, (1.0, 2.0)), standardised(coarse, (4.0, 3.0))])
    assert combined.shape == (2, 8, 8)
    torch.testing.assert_close(combined, torch.full((2, 8, 8), (1.0 + 2.0) / 2))


def test_an_ensemble_needs_two_members_with_layers() -> None:
    with pytest.raises(ValueError, match="at least 2 members"):
        create_ensemble("one", [{"name": "resnet18", "pretrained": False, "layers": ["layer2"]}])
    with pytest.raises(ValueError, match=r"members\[1\] names no layers"):
        create_ensemble(
            "e",
            [
                {"name": "resnet18", "pretrained": False, "layers": ["layer2"]},
                {"name": "resnet18", "pretrained": False},
            ],
        )


def test_ensemble_presets_compose_into_members() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        lite = compose("config", overrides=["backbone=ensemble_lite"])
        overrides = ["backbone=ensemble_b4_b5", "backbone.layers=[blocks.2]"]
        b4_b5 = compose("config", overrides=overrides)
    assert [m.name for m in lite.backbone.members] == [f"tf_efficientnet_lite{i}" for i in range(3)]
    assert b4_b5.backbone.layers == ["blocks.2"] and len(b4_b5.backbone.members) == 2
    detector = build_detector(tiny_ensemble(compose_config()))
    assert detector.embedder.feature_dims == [192, 384]


@pytest.fixture(scope="module")
def ensemble_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble")
    cfg = compose_config([f"data.root={synthetic_root}", f"tracking.root={out}/mlruns"])
    run(tiny_ensemble(cfg), out / "run")
    return out / "run"


def test_ensemble_run_keeps_a_bank_per_member_and_reloads_to_the_same_scores(
    ensemble_run: Path,
) -> None:
    metrics = json.loads((ensemble_run / "metrics.json").read_text())
    outputs = load_outputs(ensemble_run / OUTPUTS_FILE)
    banks, statistics, metadata = read_banks(ensemble_run / BANK_FILE)
    assert metrics["image_auroc"] > 0.6 and 0 <= metrics["pixel_auroc"] <= 1
    assert [bank.shape[1] for bank in banks] == [192, 384]
    assert metrics["bank_size"] == sum(len(bank) for bank in banks)
    assert len(statistics) == 2 and all(std > 0 for _, std in statistics)
    assert statistics == [tuple(s) for s in json.loads(metadata["statistics"])]
    assert outputs.maps.shape == (9, 64, 64)
    assert outputs.patch_scores.shape[-2:] == (16, 16)  # the finer member's grid
    with safe_open(str(ensemble_run / BANK_FILE), framework="pt") as file:
        assert sorted(file.keys()) == ["memory_bank", "memory_bank.1"]

    detector, _, _ = load_detector(ensemble_run / BANK_FILE)
    cfg = OmegaConf.load(ensemble_run / "config.yaml")
    data = instantiate(cfg.data)
    data.setup()
    images = next(iter(data.test_dataloader()))["image"]  # the run's first test batch
    scores, maps, _ = detector.predict(images)
    assert torch.equal(scores, outputs.image_scores[: len(images)])
    assert torch.equal(maps, outputs.maps[: len(images)])


def test_an_ensemble_predicts_and_exports_like_one_backbone(
    ensemble_run: Path, tmp_path: Path
) -> None:
    """The same detector serves the test pass, predict and the exported graph."""
    with (ensemble_run / "scores.csv").open() as file:
        expected = {row["path"]: float(row["image_score"]) for row in csv.DictReader(file)}
    test_dir = Path(next(iter(expected))).parents[1]
    predict_main([str(ensemble_run), str(test_dir), "--out", str(tmp_path / "p")])
    with (tmp_path / "p" / "predictions.csv").open() as file:
        predicted = {row["path"]: float(row["image_score"]) for row in csv.DictReader(file)}
    assert predicted == expected

    export(ensemble_run / BANK_FILE, "onnx", tmp_path / "onnx")
    images = [read_image(Path(path)) for path in expected]
    reference = load_predictor(ensemble_run / BANK_FILE).predict(images)
    exported = load_predictor(tmp_path / "onnx" / BANK_FILE, engine="onnx").predict(images)
    # Standardised ensemble scores sit around 0, where a relative bound alone means nothing.
    for ours, theirs in zip(reference, exported, strict=True):
        assert theirs.score == pytest.approx(ours.score, rel=1e-4, abs=1e-4)
