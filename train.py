"""Train and test PatchCore on one category; `-m 'category=glob(*)'` sweeps them all.

The same as `patchlab train ...`; Hydra composes conf/ and hands the job to patchlab.jobs.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from patchlab.errors import exit_now, exit_on_user_error
from patchlab.jobs import job_folder
from patchlab.jobs.settings import check_group_choices


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    from patchlab.jobs.train import job  # after Hydra: --help and config errors need none of it

    return job(cfg)


if __name__ == "__main__":
    exit_on_user_error(check_group_choices)(sys.argv[1:], Path(__file__).parent / "conf")
    job_folder.register()
    main()
    exit_now()
