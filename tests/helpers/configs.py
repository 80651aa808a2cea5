"""The real Hydra configs, pointed at synthetic data and the session's tmp stores."""

import copy
import functools
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from patchlab.jobs.pipeline import run
from patchlab.jobs.tracking import tracked_run

ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = ROOT.parent / "shared" / "data" / "mvtec_ad"

# Small, random-init backbone and tiny images: the whole pipeline in seconds on a CPU.
TEST_OVERRIDES = [
    "backbone=resnet18",
    "backbone.pretrained=false",
    "data.geometry.resize=64",
    "data.geometry.crop_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.coreset_ratio=0.25",
    "model.num_neighbors=3",
    "+trainer.enable_progress_bar=false",
]
# The session's tmp MLflow / Optuna store, set by conftest before any test runs.
SESSION_STORE: list[Path] = []


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """A copy of the real config, composed once per distinct override list per session.

    MLflow and Optuna stores default to the session's tmp dir, never the project's mlruns/
    (a test's own `tracking.root=` still wins).
    """
    store = [f"tracking.root={SESSION_STORE[0]}"] if SESSION_STORE else []
    overrides = overrides or []
    base = TEST_OVERRIDES
    if any(o.startswith("geometry=") for o in overrides):  # its own sizes, not the crop's
        base = [o for o in base if not o.startswith("data.geometry.")]
    return copy.deepcopy(_composed(tuple(base + store + overrides)))


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
    with tracked_run(cfg, output_dir) as run_log:
        metrics, _, _ = run(cfg, output_dir, run_log)
    return metrics
