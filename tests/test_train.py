"""The composed pipeline end to end on synthetic data, and its early, clear failures."""

import copy
import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from helpers.configs import ROOT, compose_config, train_command
from helpers.synthetic import make_category
from patchlab.core.coreset import SAMPLERS, CoresetSampler
from patchlab.core.features import FeatureExtractor
from patchlab.core.search import SEARCH_INDEXES, SearchIndex, nearest_neighbours
from patchlab.data.datamodule import AnomalyDataModule
from patchlab.outputs import bank_digest
from patchlab.tracking.runs import DEFAULT_ROOT
from patchlab.training.backbones import BackboneEnsemble
from patchlab.training.lightning_module import PatchCore
from patchlab.training.pipeline import run
from patchlab.tuning.study import ThresholdTuning

METRIC_KEYS = {
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
    "image_f1_max",
    "aupro",
    "fit_seconds",
    "test_seconds",
    "bank_size",
}


def test_run_writes_metrics_json(cfg: DictConfig, tmp_path: Path) -> None:
    metrics, model, _ = run(cfg, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) >= METRIC_KEYS and written == pytest.approx(metrics, nan_ok=True)
    assert 0 <= metrics["pixel_auroc"] <= 1 and metrics["image_auroc"] > 0.6
    assert metrics["bank_size"] == int(8 * 8 * 8 * 0.25) == model.banks[0].shape[0]
    assert model.outputs.maps.shape == (9, 64, 64)


def test_ivf_search_visiting_every_cell_reproduces_exact(synthetic_root, tmp_path) -> None:
    root = f"data.root={synthetic_root}"
    exact, _, _ = run(compose_config([root]), tmp_path / "exact")
    ivf = compose_config([root, "model.search=ivf", "model.ivf_probes=64"])
    approximate, model, _ = run(ivf, tmp_path / "ivf")
    assert model.scorers[0].index.faiss_index.nprobe == model.scorers[0].index.faiss_index.nlist > 1
    for key in ("image_auroc", "pixel_auroc", "pixel_f1_max", "aupro"):
        assert approximate[key] == pytest.approx(exact[key], abs=1e-4), key


class EveryNthRow(CoresetSampler):
    """A toy sampler: one class plus one registry line is all a new sampler needs."""

    def select(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.arange(0, len(features), len(features) // self.bank_size(len(features)))[
            : self.bank_size(len(features))
        ]


class TorchIndex(SearchIndex):
    """A toy index: exact search in plain torch."""

    def fit(self, bank: torch.Tensor) -> None:
        self.bank = bank

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbours(queries, self.bank, k)


def test_a_registered_sampler_and_index_run_the_pipeline(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(SAMPLERS, "every_nth_row", EveryNthRow)
    monkeypatch.setitem(SEARCH_INDEXES, "torch", TorchIndex)
    root = f"data.root={synthetic_root}"
    toy = compose_config([root, "model.sampler=every_nth_row", "model.search=torch"])
    metrics, model, _ = run(toy, tmp_path / "toy")
    assert isinstance(model.sampler, EveryNthRow) and isinstance(model.scorers[0].index, TorchIndex)
    assert metrics["bank_size"] == int(8 * 8 * 8 * 0.25)
    # The same bank through faiss's exact index scores the same: only the plug-ins changed.
    exact = compose_config([root, "model.sampler=every_nth_row"])
    reference, _, _ = run(exact, tmp_path / "exact")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-6), key


def test_a_users_own_category_folder(synthetic_root: Path, tmp_path: Path) -> None:
    config = compose_config([f"data.root={synthetic_root}", "category.name=my_part"])
    metrics, _, _ = run(config, tmp_path)
    assert not math.isnan(metrics["image_auroc"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.coreset_ratio=0", "^model.coreset_ratio must be in"),
        ("model.coreset_ratio=1.5", "^model.coreset_ratio must be in"),
        ("model.num_neighbors=500", "^model.num_neighbors=500 is larger than the memory bank"),
        ("model.search=ivf model.ivf_lists=100000", "^model.ivf_lists=100000 is larger than"),
        ("model.search=fast", "^model.search must be one of \\['exact', 'ivf'\\], got 'fast'"),
        (
            "model.sampler=fast",
            "^model.sampler must be one of \\['greedy_coreset', 'greedy_coreset_plain'\\], got",
        ),
        ("model.search=ivf model.ivf_probes=0", "^model.ivf_probes must be >= 1"),
        ("model.feature_dtype=int8", "^model.feature_dtype must be one of"),
        ("backbone.layers=[layer9]", "Unknown feature layer"),
        ("backbone.name=not_a_model", "Unknown backbone.name"),
        ("category.name=nothing_here", "Category folder .*nothing_here does not exist"),
    ],
)
def test_bad_config_fails_before_fitting(synthetic_root, tmp_path, override, message) -> None:
    config = compose_config([f"data.root={synthetic_root}", *override.split()])
    with pytest.raises(Exception, match=message):
        run(config, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_good_only_test_set_reports_nan_auroc(tmp_path: Path) -> None:
    category = make_category(tmp_path / "data", "goods", train=6, good=3, defects=1)
    for defect_type in ("scratch", "stain"):
        shutil.rmtree(category / "test" / defect_type)
    config = compose_config([f"data.root={tmp_path / 'data'}", "category.name=goods"])
    with pytest.warns(UserWarning, match="only one class"):
        metrics, _, _ = run(config, tmp_path / "out")
    assert math.isnan(metrics["image_auroc"]) and math.isnan(metrics["pixel_auroc"])


# What each config group's files build; a group missing here fails the test below.
BUILDS = {
    "backbone": (FeatureExtractor, BackboneEnsemble),
    "model": PatchCore,
    "data": AnomalyDataModule,
    "trainer": pl.Trainer,
    "threshold": (ThresholdTuning, type(None)),
}


@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_config_file_builds_what_its_group_promises(path: Path, synthetic_root) -> None:
    group, option = path.parent.name, path.stem
    if group == "category":
        assert OmegaConf.to_container(OmegaConf.load(path)) == {"name": option}
        return
    if group == "resolution":  # settings of data: the two sizes, and a crop that fits
        written = OmegaConf.load(path)
        assert set(written) == {"resize", "crop_size"} and written.crop_size <= written.resize
        assert "@package data" in path.read_text()
        return
    if group == "preset":  # a whole-config preset, added with +preset=NAME: it must compose
        assert "@package _global_" in path.read_text()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            config = compose("config", overrides=[f"+preset={option}"])
        assert config.threshold is not None  # presets are chosen on validation data, tuned
        return
    if group == "tracking":  # settings, not an object: the keys tracking/runs.py reads
        written = OmegaConf.load(path)
        assert set(written) == {
            "enabled",
            "root",
            "uri",
            "experiment",
            "register_model",
            "model_alias",
        }
        assert written.root == DEFAULT_ROOT
        return
    assert group in BUILDS, f"conf/{group}/ has no expected type in BUILDS"
    if group == "backbone":  # built without weights; TEST_OVERRIDES name a backbone of their own
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            config = compose("config", overrides=[f"backbone={option}"])
        OmegaConf.set_struct(config, False)
        if OmegaConf.is_missing(config.backbone, "members"):  # `ensemble`: the user names them
            config.backbone.members = [{"name": "resnet18", "layers": ["layer2"]}] * 2
        for member in config.backbone.get("members", [config.backbone]):
            member.pretrained, member.weights = False, None
        assert isinstance(instantiate(config.backbone), BUILDS[group])
        return
    config = compose_config([f"data.root={synthetic_root}", f"{group}={option}"])
    if group == "model":
        built = instantiate(config.model, backbone=instantiate(config.backbone))
        assert isinstance(built.sampler, CoresetSampler)
        assert isinstance(built.scorers[0].index, SearchIndex)
    else:
        built = instantiate(config[group]) if config[group] is not None else None
    assert isinstance(built, BUILDS[group]), type(built)


def test_threshold_optuna_yaml_states_the_tuning_defaults() -> None:
    """The YAML spells out every knob; the class's defaults (used to re-tune runs trained
    without tuning) must say the same."""
    written = OmegaConf.load(ROOT / "conf" / "threshold" / "optuna.yaml")
    defaults = dataclasses.asdict(ThresholdTuning())
    for key, value in defaults.items():
        if key not in ("seed", "storage"):  # interpolated from the run's seed and store
            assert OmegaConf.to_container(written)[key] == value, key


@pytest.mark.slow
def test_train_py_returns_and_writes(synthetic_root: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        train_command(synthetic_root, tmp_path), capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bottle: image_auroc=" in result.stderr + result.stdout
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())) >= METRIC_KEYS


def test_loader_workers_change_no_bit_of_the_bank_or_metrics(cfg: DictConfig, tmp_path) -> None:
    """Two runs, in-process loading against two worker processes: the same bank, bit for bit."""
    results = []
    for workers in (0, 2):
        config = copy.deepcopy(cfg)
        config.data.num_workers = workers
        config.tracking.enabled = False
        metrics, model, _ = run(config, tmp_path / str(workers))
        timing = {"fit_seconds", "test_seconds", "peak_rss_mb"}
        results.append((bank_digest(model.banks), {k: metrics[k] for k in metrics.keys() - timing}))
    assert results[0] == results[1]
