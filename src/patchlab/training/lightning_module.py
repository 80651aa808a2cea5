"""PatchCore under Lightning: one pass collects training patches, the epoch end fits the bank,
and the test loop scores through the detector's own `predict`."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch

from patchlab.core.detector import PatchCore
from patchlab.core.outputs import TestOutputs
from patchlab.core.patches import PatchCollector
from patchlab.core.stoppable import Stop
from patchlab.training.memory import trim_heap

# Both are PatchCore by design, not mistakes: it has no optimizer, and its backbone stays frozen
# in eval mode. A user seeing them would go looking for a bug that is not there. The last is
# Lightning's own use of a torch API it has not caught up with; nothing a user can change.
EXPECTED_WARNINGS = (
    r".*configure_optimizers.*returned `None`",
    r".*module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


@contextmanager
def expected_warnings_silenced() -> Iterator[None]:
    """Around `trainer.fit` and `trainer.test` only: other code keeps every warning."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def scored_pixels(batch: dict) -> torch.Tensor | None:
    """The batch's (B, H, W) `valid` pixels; None when all are, the common case."""
    valid = batch.get("valid")
    return None if valid is None or bool(valid.all()) else valid


class PatchCoreModule(pl.LightningModule):
    """Fits and tests a `PatchCore` detector; trains no weights, so no optimizer and no loss.

    Args:
        detector: The detector to fit; Lightning moves it to the trainer's device, so the
            bank, the coreset and the search run there.
        stop: Asked between steps of the coreset selection; raises to abandon it.
    """

    def __init__(self, detector: PatchCore, stop: Stop | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.detector = detector
        self.stop = stop
        self._collector: PatchCollector | None = None
        self._test_batches: list[tuple[torch.Tensor, ...]] = []
        self.outputs: TestOutputs | None = None

    def configure_optimizers(self) -> None:
        """PatchCore fits no parameters."""

    def training_step(self, batch: dict, batch_idx: int) -> None:
        images, valid = batch["image"], scored_pixels(batch)
        if self._collector is None:
            pieces = len(self.detector.units(tuple(images.shape[-2:])))
            units = len(self.trainer.train_dataloader.dataset) * pieces
            self._collector = PatchCollector(units, self.detector.feature_dtype)
        for embeddings, piece_valid in self.detector.training_patches(images, valid):
            self._collector.add(embeddings, piece_valid)

    def on_train_epoch_end(self) -> None:
        """Selects each member's coreset; patches wait in host memory (larger than a GPU's)."""
        features = self._collector.features()
        self._collector = None
        trim_heap()
        self.detector.fit(features, self.stop)

    def on_test_start(self) -> None:
        self._test_batches = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        image_scores, maps, grid = self.detector.predict(batch["image"], valid=scored_pixels(batch))
        labels, masks, known = batch["label"], batch["mask"], batch["mask_known"]
        self._test_batches.append((image_scores, labels, maps, masks, grid, known, batch["valid"]))

    def on_test_epoch_end(self) -> None:
        columns = [torch.cat(parts).cpu() for parts in zip(*self._test_batches, strict=True)]
        self.outputs = TestOutputs(*columns)
        self._test_batches = []
