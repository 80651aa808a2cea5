"""What one Hydra job does: a category trained, tested and logged, or reused, or recorded as
failed or killed so that the rest of a sweep goes on.

The config is checked before the heavy imports (torch, Lightning, MLflow): a bad setting
answers in a second or two.
"""

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig

from patchlab.errors import UserError
from patchlab.jobs import stages
from patchlab.jobs.redaction import hide_credentials
from patchlab.jobs.settings import check_settings

log = logging.getLogger(__name__)


@contextmanager
def uncollected() -> Iterator[None]:
    """Imports with the cyclic collector off, their objects then frozen out of its sight.

    torch, Lightning and MLflow make about a million objects, and the collector walked them
    again and again while they were made: importing the pipeline took 5.2 s with it on and
    3.6 s with it off. Frozen, no later collection walks them (a sweep's per-job collection
    took 0.5 s without).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()  # the little cyclic garbage the imports left is frozen with them
        if enabled:
            gc.enable()


def run_or_reuse(cfg: DictConfig, output_dir: Path, sweep: str | None) -> dict[str, float]:
    """With resume=true, a FINISHED run of the same config answers for the job."""
    with uncollected():
        # The coreset's one-off work (numba's compile after an install) runs beside the imports
        get_class(cfg.sampler._target_).prepare()
        from patchlab.jobs.pipeline import run
        from patchlab.jobs.tracking import tracked_run
    try:
        if cfg.get("resume"):
            from patchlab.jobs.resume import finished_run, reuse

            found = finished_run(cfg)
            if found is not None:
                log.info("resume=true: reusing finished run %s", found.info.run_id)
                return reuse(found, cfg, output_dir)
        # MLflow's own requests (open, params, artifacts) stay outside: a stop waits for them.
        with tracked_run(cfg, output_dir, sweep) as run_log, stages.interruptible():
            return run(cfg, output_dir, run_log)[0]  # nothing else of the run stays referenced
    finally:
        # Lightning's trainer and module refer to each other: without a collection, a sweep's
        # next job would start beside this one's features, bank and maps.
        gc.collect()
        gc.unfreeze()  # what was frozen is collectable again, by later full collections


def job(cfg: DictConfig) -> float:
    """Returns `optimized_metric` so a Hydra sweeper can optimise it.

    In a multirun a failing category is recorded (MLflow run FAILED, failed.json) and the
    sweep goes on; its summary names the failure. SIGTERM or SIGINT ends the job's run as
    KILLED (killed.json in a sweep); a single run then exits with 128 + the signal number.
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode == RunMode.MULTIRUN else None
    stages.catch_stop_signals()
    hide_credentials(cfg.tracking.uri, output_dir, *([Path(sweep)] if sweep else []))
    log.info("Job %s: %s", cfg.category.name, output_dir)
    try:
        check_settings(cfg)
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
        from patchlab.jobs.sweep import record_failure, record_killed

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
