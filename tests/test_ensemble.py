"""Backbone ensembles: normal statistics, combined maps and scores, banks per member."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from helpers.configs import ROOT, compose_config
from patchlab.core.ensemble import combine_grids, normal_statistics, standardised
from patchlab.core.search import ExactIndex
from patchlab.deploy.loading import load_predictor
from patchlab.errors import UserError
from patchlab.outputs import BANK_FILE, read_banks
from patchlab.training.backbones import BackboneEnsemble, create_ensemble
from patchlab.training.build import build_model, load_model
from patchlab.training.pipeline import run


def tiny_ensemble(cfg: DictConfig) -> DictConfig:
    """Two random-init ResNet-18 members on different grids (stride 4 and 8)."""
    cfg.backbone = OmegaConf.create(
        {
            "_target_": "patchlab.training.backbones.create_ensemble",
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
    model = build_model(tiny_ensemble(compose_config()))
    assert isinstance(model.backbone, BackboneEnsemble) and model.feature_dims == [192, 384]


def test_ensemble_run_keeps_a_bank_per_member_and_reloads_to_the_same_scores(
    cfg: DictConfig, tmp_path: Path
) -> None:
    metrics, model, datamodule = run(tiny_ensemble(cfg), tmp_path)
    assert metrics["image_auroc"] > 0.6 and 0 <= metrics["pixel_auroc"] <= 1
    assert [bank.shape[1] for bank in model.banks] == [192, 384]
    assert metrics["bank_size"] == sum(len(bank) for bank in model.banks)
    assert len(model.statistics) == 2 and all(std > 0 for _, std in model.statistics)
    assert model.outputs.maps.shape == (9, 64, 64)
    assert model.outputs.patch_scores.shape[-2:] == (16, 16)  # the finer member's grid

    banks, statistics, metadata = read_banks(tmp_path / BANK_FILE)
    assert [torch.equal(a, b) for a, b in zip(banks, model.banks, strict=True)] == [True, True]
    assert statistics == [tuple(s) for s in json.loads(metadata["statistics"])]
    with safe_open(str(tmp_path / BANK_FILE), framework="pt") as file:
        assert sorted(file.keys()) == ["memory_bank", "memory_bank.1"]

    reloaded, _ = load_model(tmp_path / BANK_FILE)
    images = next(iter(datamodule.test_dataloader()))["image"][:3]
    scores, maps, _ = reloaded.predict(images)
    torch.testing.assert_close(scores, model.outputs.image_scores[:3])
    # A batch of 3, not 4: convolution rounding differs; standardised maps pass through 0.
    torch.testing.assert_close(maps, model.outputs.maps[:3], atol=1e-4, rtol=1e-4)

    with pytest.raises(UserError, match="holds an ensemble"):
        load_predictor(tmp_path / BANK_FILE)
