"""Shared fixtures: real Hydra configs pointed at synthetic data and a temporary folder."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
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
