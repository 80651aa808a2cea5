"""Hydra multirun glue: a failed or killed category is recorded, not fatal; the sweep ends in a
summary.

With tracking on, the sweep is one MLflow run and every category job nests under it, so the
UI groups a sweep's jobs and shows its summary on the parent.
"""

import logging
import traceback
from pathlib import Path

from omegaconf import DictConfig
from pandas import DataFrame

from patchlab.artifacts.run_files import write_json
from patchlab.artifacts.store import runs_view_url, tracking_uri, ui_url
from patchlab.jobs import stages
from patchlab.jobs.redaction import hide_credentials, redact_hydra_files
from patchlab.jobs.tracking import (
    describe,
    fail_sweep_run,
    finish_sweep_run,
    first_error,
    parent_run_id,
    start_sweep_run,
)
from patchlab.reporting.summary import FAILED_FILE, KILLED_FILE, failures, write_summary

log = logging.getLogger(__name__)


def record_failure(output_dir: Path, error: BaseException) -> None:
    """Leaves the first error (not what a teardown raised after it) where the summary finds it.

    The console gets one line, the error and where its traceback is; the traceback goes to
    the job's log file (and failed.json) only, so a sweep's output stays readable.
    """
    first = first_error(error)
    trace = "".join(traceback.format_exception(first))
    _record({"error": describe(error), "traceback": trace}, output_dir / FAILED_FILE)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (trace,), None)
    for handler in files:
        handler.handle(record)
    where = files[0].baseFilename if files else output_dir / FAILED_FILE
    log.error("Job failed: %s (traceback in %s)", describe(error), where)


def record_killed(output_dir: Path, stop: stages.Interrupted) -> None:
    """Leaves the signal and the stage it stopped, so the summary lists the job as KILLED."""
    log.error("Job %s", stop)
    killed = {"error": str(stop), "signal": stop.signal_name, "stage": stop.stage}
    _record(killed, output_dir / KILLED_FILE)


def _record(fields: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(fields, path)


def sweep_results(
    table: DataFrame, picked: DataFrame | None
) -> tuple[dict[str, float], dict[str, str], str]:
    """The parent run's metrics, tags and end status from the sweep's summary table.

    Metrics carry the jobs' own names, so the parent's row in the runs table shows the sweep's
    means; a model-selection sweep also gets the picked job as a tag and its numbers as
    `selected_<metric>`. KILLED when a stop signal cut the sweep short, else FAILED when any
    category failed.
    """
    means = {k: float(v) for k, v in table.loc["mean"].items() if isinstance(v, float) and v == v}
    statuses = table.drop(index="mean")["status"]
    failed, killed = int((statuses == "FAILED").sum()), int((statuses == "KILLED").sum())
    tags = {}
    if picked is not None:
        best = picked.iloc[0]
        tags["selected_job"] = str(picked.index[0])
        means |= {f"selected_{k}": float(v) for k, v in best.items() if isinstance(v, float)}
    metrics = means | {"failed_categories": failed, "killed_categories": killed}
    status = "FAILED" if failed else "FINISHED"
    if killed or stages.received() is not None:
        status = "KILLED"
    return metrics, tags, status


def start(config: DictConfig) -> None:
    """At the sweep's start: the stop handlers for the basic launcher, the parent run, and
    log lines (the launcher's list of each job's overrides) without passwords."""
    hide_credentials(config.tracking.uri)
    if str(config.hydra.launcher.get("_target_", "")).endswith("BasicLauncher"):
        stages.catch_stop_signals()
    if config.tracking.enabled:
        start_sweep_run(config, Path(config.hydra.sweep.dir))


def finish(config: DictConfig) -> None:
    """At the sweep's end: the summary, the parent run's results, the exit status."""
    sweep_dir = Path(config.hydra.sweep.dir)
    redact_hydra_files(sweep_dir)
    run_id = parent_run_id(str(sweep_dir)) if config.tracking.enabled else None
    try:
        table, picked, paths = write_summary(sweep_dir)
    except Exception:
        if run_id:  # never leave the sweep's run looking as if it were still going
            fail_sweep_run(config, run_id)
        raise
    log.info("Sweep summary:\n%s", paths[1].read_text())
    if run_id:
        metrics, tags, status = sweep_results(table, picked)
        experiment = finish_sweep_run(config, run_id, metrics, tags, paths, status)
        view = runs_view_url(ui_url(tracking_uri(config.tracking)), experiment)
        log.info("Compare the runs: %s", view)
    failed = [name for name, _, _ in failures(table)]
    # Hydra turns a callback's exception into a warning; a sweep with failures must
    # still exit non-zero for the scripts and CI jobs that launch it.
    if stages.received() is not None:
        log.error("Sweep stopped by a signal; see %s", paths[1])
        raise SystemExit(128 + stages.received())
    if failed:
        log.error("%d jobs failed or were killed: %s; see %s", len(failed), failed, paths[1])
        raise SystemExit(1)
