"""Hydra multirun glue: a failed category is recorded, not fatal; the sweep ends in a summary."""

import json
import logging
import traceback
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from patchlab.summary import FAILED_FILE, write_summary
from patchlab.tracking import experiment_id, tracking_uri, tracking_uri_set

log = logging.getLogger(__name__)


def record_failure(output_dir: Path, error: BaseException) -> None:
    """Leaves the error in the job folder, where the sweep summary finds it."""
    log.error("Job failed: %s", "".join(traceback.format_exception(error)))
    output_dir.mkdir(parents=True, exist_ok=True)
    failure = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    (output_dir / FAILED_FILE).write_text(json.dumps(failure, indent=2))


class SweepSummary(Callback):
    """Creates the MLflow store before parallel jobs race for it; summarises the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.enabled:
            experiment_id(config.tracking)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table, paths = write_summary(sweep_dir)
        log.info("Sweep summary:\n%s", paths[1].read_text())
        if config.tracking.enabled:
            tags = {"sweep": str(sweep_dir.resolve()), "summary": "true"}
            with (
                tracking_uri_set(tracking_uri(config.tracking)),
                mlflow.start_run(
                    experiment_id=experiment_id(config.tracking),
                    run_name=f"summary {sweep_dir.name}",
                    tags=tags,
                ),
            ):
                finished = table.drop(index="mean")
                mlflow.log_metrics(
                    {
                        f"mean_{k}": float(v)
                        for k, v in table.loc["mean"].items()
                        if isinstance(v, float) and v == v
                    }
                )
                mlflow.log_metric("failed_categories", int((finished["status"] == "FAILED").sum()))
                for path in paths:
                    mlflow.log_artifact(str(path))
        failed = table[table["status"] == "FAILED"].index.tolist()
        if failed:
            # Hydra turns a callback's exception into a warning; a sweep with failures must
            # still exit non-zero for the scripts and CI jobs that launch it.
            log.error("%d categories failed: %s; see %s", len(failed), failed, paths[1])
            raise SystemExit(1)
