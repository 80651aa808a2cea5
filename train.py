"""Train and test PatchCore on one category; `-m 'category=glob(*)'` sweeps them all.

The same as `patchlab train ...`; Hydra composes conf/ and hands the job to patchlab.jobs.
"""

import hydra
from omegaconf import DictConfig

from patchlab.errors import exit_on_user_error
from patchlab.jobs.train import job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return job(cfg)


if __name__ == "__main__":
    main()
