"""MLflow, written: one run per category job, nested under its sweep's run, with its params,
metrics, dataset inputs, artifacts and model. Nothing else in the package writes to MLflow.

The job logs through the `RunLog` it is handed; with tracking off that is `NO_RUN`, which
logs nothing, so the pipeline has no branch for it.
"""

import hashlib
import json
import logging
import os
import subprocess
import threading
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

from patchlab.artifacts.bank import BANK_FILE, bank_digests
from patchlab.artifacts.run_files import write_json
from patchlab.artifacts.store import (
    RUNS_VIEW,
    redact,
    run_url,
    tracking_uri,
    tracking_uri_set,
    ui_url,
)
from patchlab.data.geometry import geometry_from
from patchlab.data.mvtec import Sample
from patchlab.errors import SettingError, message
from patchlab.jobs import stages

logger = logging.getLogger(__name__)
PACKAGES = ("torch", "torchvision", "timm", "pytorch-lightning", "mlflow", "optuna", "patchlab")
# The runs table's default shows no metric or param column; this saved view (MLflow's shared
# view state, an experiment tag) shows the ones runs are compared on.
RUNS_VIEW_STATE = {
    "selectedColumns": [
        "attributes.`Dataset`",
        *(f"metrics.`{m}`" for m in ("image_auroc", "pixel_auroc", "pixel_f1_max", "pixel_f1")),
        *(f"metrics.`{m}`" for m in ("aupro", "fit_seconds")),
        *(f"params.`{p}`" for p in ("backbone.name", "model.coreset_ratio")),
        *(f"params.`data.geometry.{p}`" for p in ("crop_size", "size")),
        # The decision a tuned run signs off: its operating point and what it gave held out.
        "params.`tuned.operating_point`",
        *(f"metrics.`{m}`" for m in ("image_threshold", "held_out_image_recall")),
        "metrics.`held_out_image_false_reject_rate`",
    ],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
# MLflow 3's UI opens an experiment without the kind tag on its GenAI traces page.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{RUNS_VIEW}": json.dumps(RUNS_VIEW_STATE),
}
RUN_FILE = "mlflow_run.json"  # in the job's folder: its MLflow run id and UI link
PARENT_RUN_FILE = ".mlflow_parent_run"  # in the sweep dir: where every job finds its parent run
# Settings that cannot change a result, left out of the config hash that resume=true matches.
NOT_HASHED = ("resume", "tracking", "data.num_workers")


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
    return f"{type(first).__name__}: {message(first)}"


def short_backbone(name: str) -> str:
    """`tf_efficientnet_lite2` -> `lite2`, `efficientnet_b5` -> `b5`: short enough for a name."""
    return name.removeprefix("tf_").removeprefix("efficientnet_")


def run_name(cfg: DictConfig) -> str:
    """What tells runs apart in the UI's list, e.g. `bottle lite2 r0.10 k9 224px untuned`: the
    last word says where the decisions come from: `untuned` (F1-optimal on the test set), or
    `tuned-<operating point>` on validation images by threshold=optuna (`tuned-f1`,
    `tuned-false_reject<=0.05`)."""
    geometry = geometry_from(OmegaConf.to_container(cfg.data.geometry, resolve=True)).label()
    tiles = f" t{cfg.model.tile_size}" if cfg.model.get("tile_size") else ""
    decisions = "untuned"
    if cfg.get("threshold"):
        from patchlab.tuning.operating_point import OperatingPoint  # only for tuned runs

        point = OmegaConf.to_container(cfg.threshold.get("operating_point") or {}, resolve=True)
        try:
            decisions = f"tuned-{OperatingPoint.of(point).label().replace(' ', '-')}"
        except SettingError:  # the job's build names the bad setting, by its config path
            decisions = "tuned"
    return (
        f"{cfg.category.name} {short_backbone(cfg.backbone.name)} "
        f"r{cfg.model.coreset_ratio:.2f} k{cfg.model.num_neighbors} {geometry}{tiles} {decisions}"
    )


def flatten(node: object, prefix: str = "") -> dict[str, str]:
    """Dotted keys as in Hydra overrides: `model.coreset_ratio`, `search._target_`, ...

    `_target_` is kept (it names the sampler, search index or backbone factory a run used);
    Hydra's other underscore keys (`_convert_`) are not settings.
    """
    if isinstance(node, dict):
        items: dict[str, str] = {}
        for key, value in node.items():
            if key == "_target_" or not str(key).startswith("_"):
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


def plain(cfg: DictConfig, resolve: bool = True) -> dict:
    """The job's config as plain data, without Hydra's own node."""
    config = OmegaConf.to_container(cfg, resolve=resolve)
    config.pop("hydra", None)
    return config


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


def run_params(cfg: DictConfig) -> dict[str, str]:
    """Every setting, a password in a URI redacted, and the versions of the packages."""
    settings = {key: redact(value) for key, value in flatten(plain(cfg)).items()}
    return settings | {f"version.{name}": version(name) for name in PACKAGES}


class RunLog:
    """What a job logs to its MLflow run; `NO_RUN` (tracking off) logs nothing."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.model_logged = False

    def metrics(self, values: dict[str, float]) -> None:
        if self.active:
            mlflow.log_metrics(values)

    def params(self, values: dict[str, object]) -> None:
        if self.active:
            mlflow.log_params(values)

    def tags(self, values: dict[str, str]) -> None:
        if self.active:
            mlflow.set_tags(values)

    def prepare_model(self) -> None:
        """Starts, in a background thread, the map MLflow builds to check a logged model's pip
        requirements against the installed packages: every installed file mapped to its
        package, 1.4 s on a 2-core machine, once per process. Called as feature extraction
        starts (torch runs without the GIL there), so the map is ready when `model` logs. A
        no-op if MLflow no longer has the function.
        """
        if not self.active:
            return
        from mlflow.utils import requirements_utils

        warm = getattr(requirements_utils, "_init_modules_to_packages_map", None)
        if warm is not None:
            threading.Thread(target=warm, name="mlflow-requirements", daemon=True).start()

    def artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if self.active:
            mlflow.log_artifacts(str(folder), artifact_path)

    def datasets(self, name: str, splits: dict[str, list[Sample]]) -> None:
        """Logs each split's image list as an MLflow dataset input (the UI's Dataset column).

        Paths are relative to the folder all images share, so the digest names the same data
        on any machine; that folder is the dataset's source.
        """
        if not self.active:
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

    def model(self, bank_path: Path, tracking: DictConfig) -> None:
        """Logs the pyfunc model, whose one artifact is the bank: the run's only copy of it.

        `tracking.register_model` also registers it and points `tracking.model_alias` at the
        new version. Signals are held: an upload is never cut in half.
        """
        if not self.active:
            return
        # MLflow's model machinery (~0.5 s of imports) only where a model is logged
        from patchlab.deploy.pyfunc import DIGESTS_KEY, ENTRY, MODEL_NAME, REQUIREMENTS, SIGNATURE

        digests = bank_digests(bank_path)  # every loader checks the bank against these
        with stages.held(), warnings.catch_warnings():
            # An input example would make MLflow load the model and score it while logging;
            # the explicit signature already says what goes in and out.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.set_tags(digests)
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(ENTRY),
                artifacts={"bank": str(bank_path)},
                signature=SIGNATURE,
                pip_requirements=REQUIREMENTS,
                metadata={DIGESTS_KEY: digests},  # not model_config: MLflow logs that as params
            )
            self.model_logged = True
            name = tracking.get("register_model")
            if name:
                registered = mlflow.register_model(info.model_uri, name)
                alias = tracking.get("model_alias") or "champion"
                MlflowClient().set_registered_model_alias(name, alias, registered.version)
        logger.info("MLflow model logged")


NO_RUN = RunLog(active=False)


@contextmanager
def tracked_run(cfg: DictConfig, output_dir: Path, sweep: str | None = None) -> Iterator[RunLog]:
    """Opens the category's MLflow run and yields its RunLog (`NO_RUN` with tracking off).

    Whatever the job wrote to `output_dir` is logged as artifacts when it ends, less the bank
    once the model holds it. On an exception the run keeps everything logged so far, gets
    `error` and `stage` tags, and ends FAILED, or KILLED when a stop signal interrupted it;
    the exception propagates.
    """
    if not cfg.tracking.enabled:
        yield NO_RUN
        return
    with tracking_uri_set(tracking_uri(cfg.tracking)), _open_run(cfg, output_dir, sweep) as log:
        yield log


@contextmanager
def existing_run(uri: str, run_id: str) -> Iterator[RunLog]:
    """A finished run opened again to add to it (a re-tune)."""
    with tracking_uri_set(uri), mlflow.start_run(run_id=run_id):
        yield RunLog(active=True)


def parent_run_id(sweep: str | None) -> str | None:
    """The sweep run this job nests under, if its sweep started one."""
    marker = Path(sweep) / PARENT_RUN_FILE if sweep else None
    return marker.read_text().strip() if marker and marker.is_file() else None


def log_folder(folder: Path, skip: set[str]) -> None:
    """The folder's files as the active run's artifacts, less the top-level names in `skip`."""
    for entry in sorted(folder.iterdir()):
        if entry.name in skip:
            continue
        if entry.is_dir():
            mlflow.log_artifacts(str(entry), entry.name)
        else:
            mlflow.log_artifact(str(entry))


@contextmanager
def _open_run(cfg: DictConfig, output_dir: Path, sweep: str | None) -> Iterator[RunLog]:
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
    experiment = experiment_id(cfg.tracking)
    with mlflow.start_run(experiment_id=experiment, run_name=run_name(cfg), tags=tags) as run:
        link = run_url(ui_url(tracking_uri(cfg.tracking)), experiment, run.info.run_id)
        logger.info("MLflow run %s: %s", run.info.run_id, link)
        output_dir.mkdir(parents=True, exist_ok=True)  # the folder says which run it is
        write_json({"run_id": run.info.run_id, "url": link}, output_dir / RUN_FILE)
        mlflow.log_params(run_params(cfg))
        log = RunLog(active=True)
        killed = False
        try:
            yield log
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
                log_folder(output_dir, {BANK_FILE} if log.model_logged else set())
            if killed:
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            logger.info("MLflow run %s logged: %s", run.info.run_id, link)


def start_sweep_run(config: DictConfig, sweep_dir: Path) -> str:
    """Creates the sweep's parent run and leaves its id in the sweep dir for the jobs."""
    client = MlflowClient(tracking_uri(config.tracking))
    tags = {"sweep": str(sweep_dir.resolve()), "summary": "true"}
    run = client.create_run(
        experiment_id(config.tracking), run_name=f"sweep {sweep_dir.name}", tags=tags
    )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)
    return run.info.run_id


def finish_sweep_run(
    config: DictConfig,
    run_id: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    paths: list[Path],
    status: str,
) -> str:
    """Logs the sweep's summary on its parent run and ends it; returns the experiment id."""
    client = MlflowClient(tracking_uri(config.tracking))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in paths:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status)
    return client.get_run(run_id).info.experiment_id


def fail_sweep_run(config: DictConfig, run_id: str) -> None:
    """Ends the parent run FAILED, so a sweep never looks as if it were still going."""
    MlflowClient(tracking_uri(config.tracking)).set_terminated(run_id, "FAILED")
