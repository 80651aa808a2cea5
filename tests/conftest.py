"""Shared fixtures: real Hydra configs pointed at synthetic data and a temporary folder."""

import hashlib
import os
import sys
from collections.abc import Iterator
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


# The project's own stores, which a test run must leave exactly as it found them.
USER_STATE = ("mlruns", "outputs", "multirun", "reports")
_session_store: list[Path] = []


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The real config; MLflow and Optuna stores default to the session's tmp dir, never the
    project's mlruns/ (a test's own `tracking.root=` still wins)."""
    store = [f"tracking.root={_session_store[0]}"] if _session_store else []
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=TEST_OVERRIDES + store + (overrides or []))


def _fingerprint(path: Path) -> str:
    """sha256 of the bytes; a big artifact (a developer's real bank) by size and mtime."""
    stat = path.stat()
    if stat.st_size > 50_000_000:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folders: tuple[str, ...]) -> dict[str, str]:
    """Every file under the project's user-state folders, by content."""
    files = (p for name in folders for p in (ROOT / name).rglob("*") if p.is_file())
    return {str(p.relative_to(ROOT)): _fingerprint(p) for p in files}


@pytest.fixture(scope="session", autouse=True)
def project_state_untouched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fails the session if any test wrote into the project's mlruns/, outputs/ or multirun/.

    Also drops MLFLOW_TRACKING_URI, so a developer's own server never receives test runs.
    """
    before = _snapshot(USER_STATE)
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    _session_store.append(tmp_path_factory.mktemp("mlruns"))
    yield
    _session_store.clear()
    if saved_uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    after = _snapshot(USER_STATE)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into the project's own folders: {changed[:10]}"


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
    """train.py in a subprocess, as a user runs it, on synthetic data under tmp_path.

    The loader keeps its default worker processes, as in a user's run: in-process tests
    turn them off for speed, which once hid a launcher that could not start them.
    """
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        *(o for o in TEST_OVERRIDES if not o.startswith("data.num_workers")),
        f"data.root={root}",
        f"hydra.run.dir={tmp_path}/run",
        f"hydra.sweep.dir={tmp_path}/multirun",
        f"tracking.root={tmp_path}/mlruns",
    ]


def tracked(overrides: list[str], output_dir: Path) -> dict[str, float]:
    """What train.py does for one category, in-process."""
    cfg = compose_config(overrides)
    with tracked_run(cfg, output_dir):
        metrics, _, _ = run(cfg, output_dir)
    return metrics
