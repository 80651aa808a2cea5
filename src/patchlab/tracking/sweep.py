"""Hydra multirun glue: a failed or killed category is recorded, not fatal; the sweep ends in a
summary.

With tracking on, the sweep is one MLflow run and every category job nests under it, so the
UI groups a sweep's jobs and shows its summary on the parent.
"""

import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from pandas import DataFrame

from patchlab.outputs import write_json
from patchlab.reporting.summary import FAILED_FILE, KILLED_FILE, failures, write_summary
from patchlab.tracking.runs import (
    PARENT_RUN_FILE,
    describe,
    experiment_id,
    first_error,
    parent_run_id,
    runs_view_url,
    tracking_uri,
    ui_url,
)
from patchlab.training import stages

log = logging.getLogger(__name__)


def record_failure(output_dir: Path, error: BaseException) -> None:
    """Leaves the first error (not what a teardown raised after it) where the summary finds it."""
    first = first_error(error)
    trace = "".join(traceback.format_exception(first))
    log.error("Job failed: %s", trace)
    _record({"error": describe(error), "traceback": trace}, output_dir / FAILED_FILE)


def record_killed(output_dir: Path, stop: stages.Interrupted) -> None:
    """Leaves the signal and the stage it stopped, so the summary lists the job as KILLED."""
    log.error("Job %s", stop)
    killed = {"error": str(stop), "signal": stop.signal_name, "stage": stop.stage}
    _record(killed, output_dir / KILLED_FILE)


def _record(fields: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(fields, path)


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
    table: DataFrame,
    picked: DataFrame | None,
    paths: list[Path],
) -> None:
    """Logs the summary on the parent run; KILLED when a stop signal cut the sweep short, else
    FAILED when any category failed.

    A model-selection sweep also gets the picked job as a tag and its numbers as
    `selected_<metric>`.
    """
    client = MlflowClient(tracking_uri(config.tracking))
    # Under the jobs' own names, so the parent's row in the runs table shows the sweep's mean.
    means = {k: float(v) for k, v in table.loc["mean"].items() if isinstance(v, float) and v == v}
    statuses = table.drop(index="mean")["status"]
    failed, killed = int((statuses == "FAILED").sum()), int((statuses == "KILLED").sum())
    if picked is not None:
        best = picked.iloc[0]
        client.set_tag(run_id, "selected_job", str(picked.index[0]))
        means |= {f"selected_{k}": float(v) for k, v in best.items() if isinstance(v, float)}
    counts = {"failed_categories": failed, "killed_categories": killed}
    for key, value in (means | counts).items():
        client.log_metric(run_id, key, value)
    for path in paths:
        client.log_artifact(run_id, str(path))
    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    if killed or stages.received() is not None:
        status = RunStatus.KILLED
    client.set_terminated(run_id, RunStatus.to_string(status))
    experiment = client.get_run(run_id).info.experiment_id
    log.info("Compare the runs: %s", runs_view_url(ui_url(client.tracking_uri), experiment))


class SweepSummary(Callback):
    """Opens the sweep's MLflow run before parallel jobs start; summarises the sweep at its end.

    With the basic launcher, which runs every job in the sweep's own process, a stop signal
    ends the running job as KILLED, marks the jobs not yet started as KILLED too, and still
    writes the summary; the sweep then exits with the signal's status. Other launchers' jobs
    are processes of their own and handle their signals themselves; their controller keeps
    the default handlers, so Ctrl+C stops it at once.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.hydra.launcher.get("_target_", "")).endswith("BasicLauncher"):
            stages.catch_stop_signals()
        if config.tracking.enabled:
            start_sweep_run(config, Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_id = parent_run_id(str(sweep_dir)) if config.tracking.enabled else None
        try:
            table, picked, paths = write_summary(sweep_dir)
        except Exception:
            if run_id:  # never leave the sweep's run looking as if it were still going
                MlflowClient(tracking_uri(config.tracking)).set_terminated(run_id, "FAILED")
            raise
        log.info("Sweep summary:\n%s", paths[1].read_text())
        if run_id:
            finish_sweep_run(config, run_id, table, picked, paths)
        failed = [name for name, _, _ in failures(table)]
        # Hydra turns a callback's exception into a warning; a sweep with failures must
        # still exit non-zero for the scripts and CI jobs that launch it.
        if stages.received() is not None:
            log.error("Sweep stopped by a signal; see %s", paths[1])
            raise SystemExit(128 + stages.received())
        if failed:
            log.error("%d jobs failed or were killed: %s; see %s", len(failed), failed, paths[1])
            raise SystemExit(1)
