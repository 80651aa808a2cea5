"""Train and test PatchCore on one category; `-m 'category=glob(*)'` sweeps them all."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from patchlab.pipeline import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns `optimized_metric` so a Hydra sweeper can optimise it."""
    metrics, _ = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
