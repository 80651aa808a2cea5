"""Train and test PatchCore on one category; `-m 'category=glob(*)'` sweeps them all."""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from patchlab.errors import UserError, exit_on_user_error
from patchlab.tracking.resume import finished_run, reuse
from patchlab.tracking.runs import tracked_run
from patchlab.tracking.sweep import record_failure, record_killed
from patchlab.training import stages
from patchlab.training.pipeline import run

log = logging.getLogger(__name__)


def run_or_reuse(cfg: DictConfig, output_dir: Path, sweep: str | None) -> dict[str, float]:
    """With resume=true, a FINISHED run of the same config answers for the job."""
    if cfg.get("resume"):
        found = finished_run(cfg)
        if found is not None:
            log.info("resume=true: reusing finished run %s", found.info.run_id)
            return reuse(found, cfg, output_dir)
    # MLflow's own requests (open, params, artifacts) stay outside: a stop waits for them.
    with tracked_run(cfg, output_dir, sweep), stages.interruptible():
        metrics, _, _ = run(cfg, output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Returns `optimized_metric` so a Hydra sweeper can optimise it.

    In a multirun a failing category is recorded (MLflow run FAILED, failed.json) and the
    sweep goes on; its summary names the failure. SIGTERM or SIGINT ends the job's run as
    KILLED (killed.json in a sweep); a single run then exits with 128 + the signal number.
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode == RunMode.MULTIRUN else None
    stages.catch_stop_signals()
    try:
        stages.stop_if_received()
        metrics = run_or_reuse(cfg, output_dir, sweep)
    except (stages.Interrupted, Exception) as error:
        stop = stages.stopped_by(error)
        if sweep is None:
            if stop is None:
                raise
            tracked = "; its MLflow run is KILLED" if cfg.tracking.enabled else ""
            log.error("Run %s%s", stop, tracked)
            raise SystemExit(stop.exit_code) from None
        if stop is None:
            record_failure(output_dir, error)
        else:
            record_killed(output_dir, stop)
        return float("nan")
    if cfg.optimized_metric not in metrics:  # checked after logging: the run itself is kept
        raise UserError(
            f"optimized_metric={cfg.optimized_metric!r} is not a metric of this run; "
            f"it has {sorted(metrics)}"
        )
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
