"""resume=true: a rerun of a sweep skips every job that already has a FINISHED run of the same
resolved config, and reruns the rest (failed, killed, never started, or changed)."""

import json
import os
import tempfile
from pathlib import Path

from mlflow.artifacts import download_artifacts
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from patchlab.artifacts.run_files import CONFIG_FILE, METRICS_FILE, write_json
from patchlab.artifacts.store import tracking_uri
from patchlab.errors import UserError
from patchlab.jobs.tracking import config_hash
from patchlab.reporting.summary import RESUMED_FILE


def finished_run(cfg: DictConfig) -> Run | None:
    """The latest FINISHED run whose `config_hash` tag matches this job's config, if any."""
    if not cfg.tracking.enabled:
        raise UserError(
            "resume=true looks for finished runs in MLflow, but tracking is off "
            "(tracking=none): turn tracking on or drop resume=true"
        )
    client = MlflowClient(tracking_uri(cfg.tracking))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.config_hash = '{config_hash(cfg)}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def reuse(run: Run, cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Puts the finished run's config.yaml and metrics.json in this job's folder, with a
    resumed.json naming the run, so the sweep's summary covers the job as if it had run.

    metrics.json comes last (downloaded aside, then renamed): it is what marks a job done.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    source = {"run_id": run.info.run_id, "config_hash": config_hash(cfg)}
    write_json(source, output_dir / RESUMED_FILE)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".download-") as folder:
        for name in (CONFIG_FILE, METRICS_FILE):
            download_artifacts(
                run_id=run.info.run_id,
                artifact_path=name,
                dst_path=folder,
                tracking_uri=tracking_uri(cfg.tracking),
            )
            os.replace(Path(folder) / name, output_dir / name)
    return json.loads((output_dir / METRICS_FILE).read_text())
