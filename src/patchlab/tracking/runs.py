"""MLflow: one run per category job, nested under its sweep's run; FAILED with the first error."""

import hashlib
import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf

from patchlab.data.mvtec import Sample
from patchlab.training import stages

PACKAGES = ("torch", "torchvision", "timm", "pytorch-lightning", "mlflow", "optuna", "patchlab")
# The runs table's default shows no metric or param column; this saved view (MLflow's shared
# view state, an experiment tag) shows the ones runs are compared on.
LOCAL_UI = "http://127.0.0.1:5000"
RUNS_VIEW = "patchlab"
RUNS_VIEW_STATE = {
    "selectedColumns": [
        "attributes.`Dataset`",
        *(f"metrics.`{m}`" for m in ("image_auroc", "pixel_auroc", "pixel_f1_max", "pixel_f1")),
        *(f"metrics.`{m}`" for m in ("aupro", "fit_seconds")),
        *(f"params.`{p}`" for p in ("backbone.name", "model.coreset_ratio", "data.crop_size")),
    ],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
# MLflow 3's UI opens an experiment without the kind tag on its GenAI traces page.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{RUNS_VIEW}": json.dumps(RUNS_VIEW_STATE),
}
PARENT_RUN_FILE = ".mlflow_parent_run"  # in the sweep dir: where every job finds its parent run
DEFAULT_ROOT = "mlruns"  # conf/tracking's `root`; a test keeps the two equal
# Settings that cannot change a result, left out of the config hash that resume=true matches.
NOT_HASHED = ("resume", "tracking", "data.num_workers")


def tracking_uri(tracking: DictConfig) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else the sqlite store under `tracking.root`."""
    if tracking.uri:
        return str(tracking.uri)
    return default_tracking_uri(tracking.root)


def default_tracking_uri(root: str | Path = DEFAULT_ROOT) -> str:
    """Where train.py logs when no URI is given: MLFLOW_TRACKING_URI, else sqlite under `root`.

    The command-line tools start here too, so they read the store train.py wrote from the
    same folder without loading any config file.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def experiment_id(tracking: DictConfig) -> str:
    """Finds or creates the experiment as a model-training one; local stores keep artifacts
    under `tracking.root`."""
    uri = tracking_uri(tracking)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(tracking.experiment)
    if found is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(tracking.root).resolve() / "artifacts").as_uri()
        try:
            return client.create_experiment(
                tracking.experiment, artifact_location=location, tags=EXPERIMENT_TAGS
            )
        except MlflowException:  # a parallel job created it first
            found = client.get_experiment_by_name(tracking.experiment)
    for key, value in EXPERIMENT_TAGS.items():
        if found.tags.get(key) != value:  # an experiment made before, or by another tool
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def ui_url(uri: str) -> str:
    """A tracking server is its own UI; a local store is opened with `mlflow ui`."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def runs_view_url(ui: str, experiment: str) -> str:
    """The experiment's runs table with the metric and setting columns shown."""
    return f"{ui}/#/experiments/{experiment}/runs?viewStateShareKey={RUNS_VIEW}"


def first_error(error: BaseException) -> BaseException:
    """The exception that started a failure.

    Lightning's teardown can raise a second error while handling the first (e.g. "Please
    call iter(combined_loader) first"), which then hides the real one; an explicit
    `raise ... from` is kept as it is, since its message was written for the user.
    """
    while error.__cause__ is None and error.__context__ is not None:
        if error.__suppress_context__:
            break
        error = error.__context__
    return error


def describe(error: BaseException) -> str:
    """`Type: message` of the failure's first error, as tags and summaries show it."""
    first = first_error(error)
    return f"{type(first).__name__}: {first}"


def short_backbone(name: str) -> str:
    """`tf_efficientnet_lite2` -> `lite2`, `efficientnet_b5` -> `b5`: short enough for a name."""
    return name.removeprefix("tf_").removeprefix("efficientnet_")


def run_name(cfg: DictConfig) -> str:
    """What tells runs apart in the UI's list, e.g. `bottle lite2 r0.10 k9 224px`."""
    return (
        f"{cfg.category.name} {short_backbone(cfg.backbone.name)} "
        f"r{cfg.model.coreset_ratio:.2f} k{cfg.model.num_neighbors} {cfg.data.crop_size}px"
    )


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


def config_hash(cfg: DictConfig) -> str:
    """The config's fingerprint, less the settings that cannot change a result.

    Stored as the `config_hash` tag on every run, so `resume=true` can find a finished run of
    the same job.
    """
    # Unresolved: `threshold.storage` interpolates `tracking.root`, which must not count.
    config = plain(cfg, resolve=False)
    for dotted in NOT_HASHED:
        *parents, key = dotted.split(".")
        node = config
        for parent in parents:
            node = node.get(parent, {})
        node.pop(key, None)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plain(cfg: DictConfig, resolve: bool = True) -> dict:
    """The job's config as plain data, without Hydra's own node."""
    config = OmegaConf.to_container(cfg, resolve=resolve)
    config.pop("hydra", None)
    return config


def run_params(cfg: DictConfig) -> dict[str, str]:
    return flatten(plain(cfg)) | {f"version.{name}": version(name) for name in PACKAGES}


@contextmanager
def tracked_run(cfg: DictConfig, output_dir: Path, sweep: str | None = None) -> Iterator[bool]:
    """Opens the category's MLflow run; yields whether tracking is on.

    Whatever the job wrote to `output_dir` is logged as artifacts when it ends. On an
    exception the run keeps everything logged so far, gets `error` and `stage` tags, and ends
    FAILED, or KILLED when a stop signal interrupted it; the exception propagates.
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


def parent_run_id(sweep: str | None) -> str | None:
    """The sweep run this job nests under, if its sweep started one."""
    marker = Path(sweep) / PARENT_RUN_FILE if sweep else None
    return marker.read_text().strip() if marker and marker.is_file() else None


@contextmanager
def _open_run(cfg: DictConfig, output_dir: Path, sweep: str | None) -> Iterator[None]:
    tags = {
        "category": cfg.category.name,
        "backbone": cfg.backbone.name,
        "git_commit": git_commit(),
        "sweep": sweep or "none",
        "config_hash": config_hash(cfg),
    }
    parent = parent_run_id(sweep)
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    with mlflow.start_run(
        experiment_id=experiment_id(cfg.tracking), run_name=run_name(cfg), tags=tags
    ):
        mlflow.log_params(run_params(cfg))
        killed = False
        try:
            yield
        except BaseException as error:
            stop = stages.stopped_by(error)
            if stop is not None:
                mlflow.set_tags({"stage": stop.stage, "error": str(stop)})
                killed = True
            elif isinstance(error, Exception):
                mlflow.set_tags({"stage": stages.current(), "error": describe(error)[:4000]})
            raise
        finally:
            if output_dir.is_dir():
                mlflow.log_artifacts(str(output_dir))
            if killed:
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))


def log_metrics(metrics: dict[str, float]) -> None:
    """Logs to the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)


def log_datasets(name: str, splits: dict[str, list[Sample]]) -> None:
    """Logs each split's image list as an MLflow dataset input (the UI's Dataset column).

    Paths are relative to the folder all images share, so the digest names the same data on
    any machine; that folder is the dataset's source.
    """
    if mlflow.active_run() is None:
        return
    resolved = {name: [s.image.resolve() for s in samples] for name, samples in splits.items()}
    root = Path(os.path.commonpath([p for paths in resolved.values() for p in paths]))
    for context, samples in splits.items():
        frame = pd.DataFrame(
            {
                "path": [os.path.relpath(path, root) for path in resolved[context]],
                "defect_type": [s.defect_type for s in samples],
                "label": [s.label for s in samples],
            }
        )
        digest = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()[:8]
        # MLflow warns that a local path could be one of two identical source types, and
        # that integer labels cannot hold missing values: neither concerns an image list.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                frame, source=str(root), name=name, targets="label", digest=digest
            )
            mlflow.log_input(dataset, context=context)


def log_params(params: dict[str, object]) -> None:
    """Logs to the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.log_params(params)


def log_tags(tags: dict[str, str]) -> None:
    """Sets on the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)
