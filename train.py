"""Train and test PatchCore on one category; `-m 'category=glob(*)'` sweeps them all."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from patchlab.errors import UserError, exit_on_user_error
from patchlab.tracking.runs import tracked_run
from patchlab.tracking.sweep import record_failure
from patchlab.training.pipeline import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Returns `optimized_metric` so a Hydra sweeper can optimise it.

    In a multirun a failing category is recorded (MLflow run FAILED, failed.json) and the
    sweep goes on; its summary names the failure.
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        with tracked_run(cfg, output_dir, sweep):
            metrics, _, _ = run(cfg, output_dir)
    except Exception as error:
        if sweep is None:
            raise
        record_failure(output_dir, error)
        return float("nan")
    if cfg.optimized_metric not in metrics:  # checked after logging: the run itself is kept
        raise UserError(
            f"optimized_metric={cfg.optimized_metric!r} is not a metric of this run; "
            f"it has {sorted(metrics)}"
        )
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
