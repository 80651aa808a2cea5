"""MLflow: one run per category job, params from the config, FAILED with the error on a raise."""

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

PACKAGES = ("torch", "torchvision", "timm", "pytorch-lightning", "mlflow", "optuna", "patchlab")


def tracking_uri(tracking: DictConfig) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else the sqlite store under `tracking.root`."""
    if tracking.uri:
        return str(tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(tracking.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def experiment_id(tracking: DictConfig) -> str:
    """Finds or creates the experiment; local stores keep artifacts under `tracking.root`."""
    uri = tracking_uri(tracking)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(tracking.root).resolve() / "artifacts").as_uri()
    try:
        return client.create_experiment(tracking.experiment, artifact_location=location)
    except MlflowException:  # a parallel job created it first
        return client.get_experiment_by_name(tracking.experiment).experiment_id


def flatten(node: object, prefix: str = "") -> dict[str, str]:
    """Dotted keys as in Hydra overrides: `model.coreset_ratio`, `backbone.layers`, ..."""
    if isinstance(node, dict):
        items: dict[str, str] = {}
        for key, value in node.items():
            if not str(key).startswith("_"):
                items |= flatten(value, f"{prefix}{key}.")
        return items
    return {prefix.rstrip("."): str(node)}


def git_commit() -> str:
    """The project's commit, or "unknown" outside a git checkout."""
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def run_params(cfg: DictConfig) -> dict[str, str]:
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return flatten(config) | {f"version.{name}": version(name) for name in PACKAGES}


@contextmanager
def tracked_run(cfg: DictConfig, output_dir: Path, sweep: str | None = None) -> Iterator[bool]:
    """Opens the category's MLflow run; yields whether tracking is on.

    Whatever the job wrote to `output_dir` is logged as artifacts when it ends. On an
    exception the run keeps everything logged so far, gets an `error` tag, and ends FAILED;
    the exception propagates.
    """
    if not cfg.tracking.enabled:
        yield False
        return
    with tracking_uri_set(tracking_uri(cfg.tracking)), _open_run(cfg, output_dir, sweep):
        yield True


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that afterwards, or the
    next run in this process would silently follow it instead of its own config."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@contextmanager
def _open_run(cfg: DictConfig, output_dir: Path, sweep: str | None) -> Iterator[None]:
    tags = {
        "category": cfg.category.name,
        "backbone": cfg.backbone.name,
        "git_commit": git_commit(),
        "sweep": sweep or "none",
    }
    with mlflow.start_run(
        experiment_id=experiment_id(cfg.tracking), run_name=cfg.category.name, tags=tags
    ):
        mlflow.log_params(run_params(cfg))
        try:
            yield
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:4000])
            raise
        finally:
            if output_dir.is_dir():
                mlflow.log_artifacts(str(output_dir))


def log_metrics(metrics: dict[str, float]) -> None:
    """Logs to the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)


def log_params(params: dict[str, object]) -> None:
    """Logs to the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.log_params(params)
