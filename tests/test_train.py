"""The composed pipeline end to end on synthetic data, and its early, clear failures."""

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from helpers.configs import ROOT, compose_config
from helpers.synthetic import make_category
from patchlab.artifacts.bank import ALLOWED_TARGETS, BUILT_GROUPS, bank_digest
from patchlab.artifacts.run_files import OUTPUTS_FILE, load_outputs
from patchlab.artifacts.store import DEFAULT_ROOT
from patchlab.core.backbones import BackboneEnsemble
from patchlab.core.coreset import CoresetSampler
from patchlab.core.detector import PatchCore
from patchlab.core.features import FeatureExtractor
from patchlab.core.search import SearchIndex, nearest_neighbours
from patchlab.core.stoppable import Stop
from patchlab.data.geometry import Geometry
from patchlab.errors import UserError
from patchlab.jobs.pipeline import run
from patchlab.jobs.settings import check_settings
from patchlab.training.datamodule import AnomalyDataModule
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
    metrics, detector, _ = run(cfg, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) >= METRIC_KEYS and written == pytest.approx(metrics, nan_ok=True)
    assert 0 <= metrics["pixel_auroc"] <= 1 and metrics["image_auroc"] > 0.6
    assert metrics["bank_size"] == int(8 * 8 * 8 * 0.25) == detector.banks[0].shape[0]
    assert load_outputs(tmp_path / OUTPUTS_FILE).maps.shape == (9, 64, 64)


def test_ivf_search_visiting_every_cell_reproduces_exact(synthetic_root, tmp_path) -> None:
    root = f"data.root={synthetic_root}"
    exact, _, _ = run(compose_config([root]), tmp_path / "exact")
    ivf = compose_config([root, "search=ivf", "search.ivf_probes=64"])
    approximate, detector, _ = run(ivf, tmp_path / "ivf")
    index = detector.scorers[0].index.faiss_index
    assert index.nprobe == index.nlist > 1
    for key in ("image_auroc", "pixel_auroc", "pixel_f1_max", "aupro"):
        assert approximate[key] == pytest.approx(exact[key], abs=1e-4), key


class EveryNthRow(CoresetSampler):
    """A toy sampler: a class and a config node naming it are all a new sampler needs."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def choose(
        self, features: torch.Tensor, keep: int, generator: torch.Generator, stop: Stop | None
    ) -> torch.Tensor:
        return torch.arange(self.offset, len(features), len(features) // keep)[:keep]


class TorchIndex(SearchIndex):
    """A toy index: exact search in plain torch."""

    def fit(self, bank: torch.Tensor) -> None:
        self.bank = bank

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbours(queries, self.bank, k)


def with_plugins(cfg: DictConfig, sampler: bool, index: bool) -> DictConfig:
    """The config a user's own conf/sampler/ and conf/search/ files would compose."""
    if sampler:
        cfg.sampler = OmegaConf.create({"_target_": f"{__name__}.EveryNthRow", "offset": 1})
    if index:
        cfg.search = OmegaConf.create({"_target_": f"{__name__}.TorchIndex"})
    check_settings(cfg)
    return cfg


def test_a_new_sampler_and_index_are_a_class_and_a_config_node(
    synthetic_root: Path, tmp_path: Path
) -> None:
    root = f"data.root={synthetic_root}"
    toy = with_plugins(compose_config([root]), sampler=True, index=True)
    metrics, detector, _ = run(toy, tmp_path / "toy")
    assert isinstance(detector.sampler, EveryNthRow) and detector.sampler.offset == 1
    assert isinstance(detector.scorers[0].index, TorchIndex)
    assert metrics["bank_size"] == int(8 * 8 * 8 * 0.25)
    # The same bank through faiss's exact index scores the same: only the plug-ins changed.
    exact = with_plugins(compose_config([root]), sampler=True, index=False)
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
        ("model.coreset_ratio=0", "^model.coreset_ratio must be > 0 and <= 1"),
        ("model.coreset_ratio=1.5", "^model.coreset_ratio must be > 0 and <= 1"),
        ("model.num_neighbors=500", "^model.num_neighbors=500 is larger than the memory bank"),
        ("search=ivf search.ivf_lists=100000", "^search.ivf_lists=100000 is larger than"),
        ("search=ivf search.ivf_probes=0", "^search.ivf_probes must be >= 1"),
        ("sampler.coreset_dtype=int8", "^sampler.coreset_dtype must be in \\[.float32."),
        ("model.feature_dtype=int8", "^model.feature_dtype must be in \\[.float32."),
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


def test_a_setting_the_chosen_class_does_not_take_fails_naming_the_key(synthetic_root) -> None:
    root = f"data.root={synthetic_root}"
    with pytest.raises(Exception, match=r"search\.ivf_probes"):  # Hydra: not in exact.yaml
        compose_config([root, "search.ivf_probes=4"])
    forced = compose_config([root, "+search.ivf_probes=4"])
    with pytest.raises(UserError, match=r"^search\.ivf_probes is not a setting of .*ExactIndex"):
        check_settings(forced)
    with pytest.raises(UserError, match="it is a setting of search=ivf"):
        check_settings(forced)
    with pytest.raises(UserError, match=r"^model\.backbone is not a setting"):
        check_settings(compose_config([root, "+model.backbone=x"]))  # passed by the build
    check_settings(compose_config([root, "search=ivf", "search.ivf_probes=4"]))


def test_an_unknown_option_fails_at_composition_naming_its_group(synthetic_root) -> None:
    with pytest.raises(Exception, match="search"):
        compose_config([f"data.root={synthetic_root}", "search=fast"])


def test_banks_may_build_exactly_the_classes_the_configs_name() -> None:
    named = set()
    for group in BUILT_GROUPS:  # data.geometry is composed from conf/geometry/
        for path in (ROOT / "conf" / group.removeprefix("data.")).glob("*.yaml"):
            named |= {
                line.split(":", 1)[1].strip()
                for line in path.read_text().splitlines()
                if line.strip().startswith("_target_:")
            }
    assert named == ALLOWED_TARGETS


# What each config group's files build; a group missing here fails the test below.
BUILDS = {
    "backbone": (FeatureExtractor, BackboneEnsemble),
    "model": PatchCore,
    "sampler": CoresetSampler,
    "search": SearchIndex,
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
    if group == "geometry":  # data.geometry: a geometry class and its arguments
        assert "@package data.geometry" in path.read_text()
        config = compose_config([f"data.root={synthetic_root}", f"geometry={option}"])
        check_settings(config)
        assert isinstance(instantiate(config.data.geometry), Geometry)
        return
    if group == "preset":  # a whole-config preset, added with +preset=NAME: it must compose
        assert "@package _global_" in path.read_text()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            config = compose("config", overrides=[f"+preset={option}"])
        assert config.threshold is not None  # presets are chosen on validation data, tuned
        return
    if group == "tracking":  # settings, not an object: one node, switched by `enabled`
        tracking = compose_config([f"tracking={option}"]).tracking
        keys = {"enabled", "root", "uri", "experiment", "register_model", "model_alias"}
        assert set(tracking) == keys and tracking.enabled == (option != "none")
        assert OmegaConf.load(ROOT / "conf" / "tracking" / "mlflow.yaml").root == DEFAULT_ROOT
        return
    assert group in BUILDS, f"conf/{group}/ has no expected type in BUILDS"
    if group == "backbone":  # built without weights; TEST_OVERRIDES name a backbone of their own
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            config = compose("config", overrides=[f"backbone={option}"])
        check_settings(config)
        OmegaConf.set_struct(config, False)
        if OmegaConf.is_missing(config.backbone, "members"):  # `ensemble`: the user names them
            config.backbone.members = [{"name": "resnet18", "layers": ["layer2"]}] * 2
        for member in config.backbone.get("members", [config.backbone]):
            member.pretrained, member.weights = False, None
        assert isinstance(instantiate(config.backbone), BUILDS[group])
        return
    config = compose_config([f"data.root={synthetic_root}", f"{group}={option}"])
    check_settings(config)  # every key is an argument of the file's class
    if group == "model":
        built = instantiate(
            config.model,
            backbone=instantiate(config.backbone),
            sampler=instantiate(config.sampler),
            search=instantiate(config.search, _partial_=True),
        )
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
