"""Lightning data module over one MVTec-layout category."""

import logging
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from patchlab.data.download import MANUAL_STEPS, download_mvtec
from patchlab.data.mvtec import ImageTransform, MVTecDataset, Sample, scan_test, scan_train

log = logging.getLogger(__name__)


def worker_context() -> multiprocessing.context.BaseContext:
    """The platform's standard start method for loader workers.

    Inside a joblib (loky) launcher job the default context is loky's own, whose processes
    cannot start DataLoader workers; the standard library's default for this OS (listed
    first) works there and everywhere else.
    """
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])


class MVTecDataModule(pl.LightningDataModule):
    """Checks the category folder up front, so bad data fails before any model work.

    Args:
        root: Folder holding one sub-folder per category.
        category: Sub-folder name; any name works for a user's own parts.
        download: Fetch MVTec AD into `root` when the category is missing.
        holdout: train/good images kept out of the memory bank (seeded pick), e.g. to carry
            synthetic anomalies for tuning.
    """

    def __init__(
        self,
        root: str,
        category: str,
        resize: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 32,
        num_workers: int = 2,
        download: bool = False,
        holdout: int = 0,
    ) -> None:
        super().__init__()
        if crop_size > resize:
            raise ValueError(f"data.crop_size ({crop_size}) must not exceed data.resize ({resize})")
        self.root = Path(root).expanduser()
        self.category = category
        self.transform = ImageTransform(resize, crop_size, list(mean), list(std))
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.holdout = holdout
        self.holdout_samples: list[Sample] = []
        self.train_samples: list[Sample] = []
        self.test_samples: list[Sample] = []

    def prepare_data(self) -> None:
        """Downloads MVTec AD when asked to and the category is not there yet."""
        if self.download and not (self.root / self.category).is_dir():
            download_mvtec(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        category_dir = self.root / self.category
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root {self.root} does not exist. "
                + MANUAL_STEPS.format(root=self.root)
                + " Or set data.download=true."
            )
        if not category_dir.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"Category folder {category_dir} does not exist; {self.root} holds {found}"
            )
        self.train_samples = scan_train(category_dir)
        if self.holdout:
            self._hold_back()
        self.test_samples = scan_test(category_dir)
        log.info(
            "%s: %d train, %d test images (%d defective)",
            self.category,
            len(self.train_samples),
            len(self.test_samples),
            sum(s.label for s in self.test_samples),
        )

    def _hold_back(self) -> None:
        if self.holdout >= len(self.train_samples):
            raise ValueError(
                f"Cannot hold back {self.holdout} of {len(self.train_samples)} train/good images "
                "for synthetic validation; lower threshold.synthetic_images"
            )
        order = torch.randperm(len(self.train_samples), generator=torch.Generator().manual_seed(0))
        held = set(order[: self.holdout].tolist())
        self.holdout_samples = [s for i, s in enumerate(self.train_samples) if i in held]
        self.train_samples = [s for i, s in enumerate(self.train_samples) if i not in held]

    def holdout_images(self) -> torch.Tensor:
        """(N, 3, S, S) preprocessed held-back good images."""
        dataset = MVTecDataset(self.holdout_samples, self.transform)
        return torch.stack([dataset[i]["image"] for i in range(len(dataset))])

    def _loader(self, samples: list[Sample]) -> DataLoader:
        return DataLoader(
            MVTecDataset(samples, self.transform),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=False,
            multiprocessing_context=worker_context() if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples)
