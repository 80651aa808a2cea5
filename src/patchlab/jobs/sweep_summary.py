"""The Hydra callback of every run: for a multirun, it opens the sweep's MLflow run before
parallel jobs start and summarises the sweep at its end (`jobs/sweep.py`).

Hydra builds it for single runs too, before the job: so this module imports nothing heavy,
and a config error still answers at once.
"""

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from patchlab.jobs import job_folder

# Every launcher unpickles this callback in each job's process before Hydra names the job's
# folder, so registering here makes `${job_folder:...}` resolvable in joblib and SLURM workers.
job_folder.register()


class SweepSummary(Callback):
    """With the basic launcher, which runs every job in the sweep's own process, a stop signal
    ends the running job as KILLED, marks the jobs not yet started as KILLED too, and still
    writes the summary; the sweep then exits with the signal's status. Other launchers' jobs
    are processes of their own and handle their signals themselves; their controller keeps
    the default handlers, so Ctrl+C stops it at once.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from patchlab.jobs.sweep import start

        start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from patchlab.jobs.sweep import finish

        finish(config)
