"""Session fixtures: the project's own stores stay untouched; configs point at tmp folders."""

import copy
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from helpers.configs import REAL_DATA, ROOT, SESSION_STORE, compose_config
from helpers.synthetic import make_category

# The project's own stores, which a test run must leave exactly as it found them.
USER_STATE = ("mlruns", "outputs", "multirun", "reports")


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
    SESSION_STORE.append(tmp_path_factory.mktemp("mlruns"))
    yield
    SESSION_STORE.clear()
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


@pytest.fixture(scope="session")
def session_cfg(synthetic_root: Path) -> DictConfig:
    """The real config on synthetic data, composed once for the session."""
    return compose_config([f"data.root={synthetic_root}"])


@pytest.fixture
def cfg(session_cfg: DictConfig, tmp_path: Path) -> DictConfig:
    """A copy of the session's config whose MLflow and Optuna stores are this test's own."""
    copied = copy.deepcopy(session_cfg)
    with open_dict(copied):
        copied.tracking.root = str(tmp_path / "mlruns")
    return copied


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    if not (REAL_DATA / "bottle").is_dir():
        pytest.skip(f"real MVTec AD bottle not found at {REAL_DATA} (see shared/data/README.md)")
    return REAL_DATA
