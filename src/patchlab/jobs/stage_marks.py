"""The stages Lightning runs, marked for the logs and for an interrupted run's `stage` tag."""

import pytorch_lightning as pl

from patchlab.jobs.stages import enter


class StageMarks(pl.Callback):
    """Marks the stages Lightning runs. Callback hooks run before the module's own, so
    "coreset selection" is marked before the module's epoch end selects the coreset."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        enter("feature extraction")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        enter("coreset selection")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        enter("scoring")
