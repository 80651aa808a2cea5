"""Shared fixtures: real Hydra configs pointed at synthetic data and a temporary folder."""

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from patchlab.pipeline import run
from patchlab.tracking import tracked_run
from synthetic import make_category

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "mvtec_ad"

# Small, random-init backbone and tiny images: the whole pipeline in seconds on a CPU.
TEST_OVERRIDES = [
    "backbone=resnet18",
    "backbone.pretrained=false",
    "data.resize=64",
    "data.crop_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.coreset_ratio=0.25",
    "model.num_neighbors=3",
    "+trainer.enable_progress_bar=false",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=TEST_OVERRIDES + (overrides or []))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic categories that tests only read."""
    root = tmp_path_factory.mktemp("mvtec")
    make_category(root, "bottle", seed=0)
    make_category(root, "my_part", seed=1)
    return root


@pytest.fixture
def cfg(synthetic_root: Path) -> DictConfig:
    """The real composed config on synthetic data; tests pass tmp_path as the output dir."""
    return compose_config([f"data.root={synthetic_root}"])


@pytest.fixture
def real_data_root() -> Path:
    if not (REAL_DATA / "bottle").is_dir():
        pytest.skip(f"real MVTec AD bottle not found at {REAL_DATA} (see shared/data/README.md)")
    return REAL_DATA


def train_command(root: Path, tmp_path: Path, *args: str) -> list[str]:
    """train.py in a subprocess, as a user runs it, on synthetic data under tmp_path."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        *TEST_OVERRIDES,
        f"data.root={root}",
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]


def tracked(overrides: list[str], output_dir: Path) -> dict[str, float]:
    """What train.py does for one category, in-process."""
    cfg = compose_config(overrides)
    with tracked_run(cfg, output_dir):
        metrics, _, _ = run(cfg, output_dir)
    return metrics
