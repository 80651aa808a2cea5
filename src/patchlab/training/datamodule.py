"""Lightning data modules: one base for preprocessing and loaders, one subclass per layout."""

import logging
import multiprocessing
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from patchlab.data.download import MANUAL_STEPS, download_mvtec
from patchlab.data.geometry import CenterCrop, Geometry
from patchlab.data.mvtec import (
    MVTecDataset,
    Sample,
    good_samples,
    pair_masks,
    read_image,
    require_images,
    scan_test,
    scan_train,
    seeded_split,
)
from patchlab.data.preprocessing import MASK_LEVEL, Preprocessing
from patchlab.errors import check_limits

log = logging.getLogger(__name__)
UNSEEN_WARNING = 0.25  # share of an image a geometry may drop without saying so
ALIGN = 32  # suggested input sizes are multiples of the coarsest backbone stride
ABNORMAL = "abnormal"  # defect type of every image in a folder layout's abnormal folder


def worker_context() -> multiprocessing.context.BaseContext:
    """The platform's standard start method for loader workers.

    Inside a joblib (loky) launcher job the default context is loky's own, whose processes
    cannot start DataLoader workers; the standard library's default for this OS (listed
    first) works there and everywhere else.
    """
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])


def unseen_warning(geometry: Geometry, samples: list[Sample]) -> str | None:
    """One sentence when the geometry leaves more than UNSEEN_WARNING of an image unscored,
    naming the share and the setting that keeps the whole image; None otherwise."""
    sizes = Counter(sample.size for sample in samples if sample.size is not None)
    if not sizes:
        return None
    worst = min(sizes, key=lambda size: geometry.place(size).kept_share())
    unseen = 1 - geometry.place(worst).kept_share()
    if unseen <= UNSEEN_WARNING:
        return None
    (height, width), _ = sizes.most_common(1)[0]
    side = min(geometry.size())
    scale = side / min(height, width)
    fit = [max(ALIGN, round(length * scale / ALIGN) * ALIGN) for length in (height, width)]
    return (
        f"{unseen:.0%} of each {worst[0]}x{worst[1]} image is never scored: the geometry "
        f"({geometry.describe()}) keeps only its centre, so a defect in the rest passes and the "
        "pixel metrics do not see it. To keep the whole image: "
        f"geometry=fit data.geometry.size=[{fit[0]},{fit[1]}]"
    )


class AnomalyDataModule(pl.LightningDataModule):
    """Checks the data up front, so bad data fails before any model work.

    Subclasses differ only in `scan`, which lists and checks the train and test samples.

    Args:
        geometry: Where each image's pixels go in the model input (`geometry=` group).
        ignore_mask: An image file whose white pixels are ignored in every image (stretched
            to each image's size): not in the bank, not scored, not in any metric.
        holdout: train/good images kept out of the memory bank (seeded pick), e.g. to carry
            synthetic anomalies for tuning.
    """

    name = "data"
    no_masks_reason = "no masks"  # logged once when the test set is image-only
    LIMITS: ClassVar = {"batch_size": [(">=", 1)], "num_workers": [(">=", 0)]}  # a literal

    def __init__(
        self,
        geometry: Geometry | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 32,
        num_workers: int = 2,
        ignore_mask: str | None = None,
        holdout: int = 0,
    ) -> None:
        super().__init__()
        check_limits(self.LIMITS, locals())
        geometry = geometry if geometry is not None else CenterCrop()
        ignore = None
        if ignore_mask is not None:
            ignore = read_image(Path(ignore_mask).expanduser(), "L")[0] >= MASK_LEVEL
        self.preprocessing = Preprocessing(geometry, mean, std, ignore)
        self.input_size = geometry.size()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.holdout = holdout
        self.holdout_samples: list[Sample] = []
        self.train_samples: list[Sample] = []
        self.test_samples: list[Sample] = []

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        """Train and test samples, checked; raises naming what is wrong."""
        raise NotImplementedError

    @property
    def pixel_labelled(self) -> bool:
        """Whether every test image has pixel labels; False means image-only mode."""
        return all(sample.mask_known for sample in self.test_samples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        self.train_samples, self.test_samples = self.scan()
        if self.holdout:
            self._hold_back()
        log.info(
            "%s: %d train, %d test images (%d defective)",
            self.name,
            len(self.train_samples),
            len(self.test_samples),
            sum(s.label for s in self.test_samples),
        )
        if not self.pixel_labelled:
            log.info(
                "%s: %s: image-only mode, pixel metrics skipped", self.name, self.no_masks_reason
            )
        warning = unseen_warning(
            self.preprocessing.geometry, self.train_samples + self.test_samples
        )
        if warning:
            log.warning("%s: %s", self.name, warning)

    def _hold_back(self) -> None:
        if self.holdout >= len(self.train_samples):
            raise ValueError(
                f"Cannot hold back {self.holdout} of {len(self.train_samples)} train/good images "
                "for synthetic validation; lower threshold.synthetic_images"
            )
        self.holdout_samples, self.train_samples = seeded_split(
            self.train_samples, self.holdout, seed=0
        )

    def holdout_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) preprocessed held-back good images and their (N, H, W) valid pixels."""
        dataset = MVTecDataset(self.holdout_samples, self.preprocessing)
        items = [dataset[i] for i in range(len(dataset))]
        return torch.stack([i["image"] for i in items]), torch.stack([i["valid"] for i in items])

    def _loader(self, samples: list[Sample]) -> DataLoader:
        return DataLoader(
            MVTecDataset(samples, self.preprocessing),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=False,
            multiprocessing_context=worker_context() if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples)


class MVTecDataModule(AnomalyDataModule):
    """One category of an MVTec AD layout folder; without `ground_truth/` it is image-only.

    Args:
        root: Folder holding one sub-folder per category.
        category: Sub-folder name; any name works for a user's own parts.
        download: Fetch MVTec AD into `root` when the category is missing.
    """

    def __init__(
        self,
        root: str,
        category: str,
        geometry: Geometry | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 32,
        num_workers: int = 2,
        download: bool = False,
        ignore_mask: str | None = None,
        holdout: int = 0,
    ) -> None:
        super().__init__(geometry, mean, std, batch_size, num_workers, ignore_mask, holdout)
        self.root = Path(root).expanduser()
        self.category = self.name = category
        self.download = download
        self.no_masks_reason = f"no ground_truth/ folder in {self.root / category}"

    def prepare_data(self) -> None:
        """Downloads MVTec AD when asked to and the category is not there yet."""
        if self.download and not (self.root / self.category).is_dir():
            download_mvtec(self.root)

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        category_dir = self.root / self.category
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root {self.root} does not exist. "
                + MANUAL_STEPS.format(root=self.root)
                + " Or set data.download=true."
            )
        if not category_dir.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            if not found:
                raise FileNotFoundError(
                    f"data.root {self.root} is empty (no category folders). "
                    + MANUAL_STEPS.format(root=self.root)
                    + " Or set data.download=true."
                )
            raise FileNotFoundError(
                f"Category folder {category_dir} does not exist; {self.root} holds {found}"
            )
        return scan_train(category_dir), scan_test(category_dir)


class FolderDataModule(AnomalyDataModule):
    """A plain folder layout: normal images, abnormal images, optionally their masks.

    Folders are relative to `root`. Masks are matched to abnormal images by stem
    (`<stem>_mask.png` or `<stem>.png`, any image suffix).

    Args:
        root: Base folder of this part.
        normal_dir: Good images; all train the bank unless `normal_test_dir` is null.
        abnormal_dir: Defective images, all for testing.
        mask_dir: Masks of the abnormal images; null runs image-only.
        normal_test_dir: Good images for testing; null holds out `normal_split` of `normal_dir`.
        normal_split: Fraction of `normal_dir` tested rather than trained on (seeded pick).
        split_seed: Seed of that pick, apart from `seed` so reseeding a model keeps the test set.
    """

    def __init__(
        self,
        root: str,
        normal_dir: str = "good",
        abnormal_dir: str = "defect",
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
        normal_split: float = 0.2,
        split_seed: int = 0,
        geometry: Geometry | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 32,
        num_workers: int = 2,
        ignore_mask: str | None = None,
        holdout: int = 0,
    ) -> None:
        super().__init__(geometry, mean, std, batch_size, num_workers, ignore_mask, holdout)
        self.root = Path(root).expanduser()
        self.name = self.root.name
        self.normal_dir = self.root / normal_dir
        self.abnormal_dir = self.root / abnormal_dir
        self.mask_dir = None if mask_dir is None else self.root / mask_dir
        self.normal_test_dir = None if normal_test_dir is None else self.root / normal_test_dir
        self.normal_split = normal_split
        self.split_seed = split_seed
        self.no_masks_reason = "data.mask_dir is null"

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        train, test_goods = self._scan_normal()
        abnormal = require_images(self.abnormal_dir, "abnormal images (data.abnormal_dir)")
        return train, test_goods + pair_masks(abnormal, ABNORMAL, self.mask_dir)

    def _scan_normal(self) -> tuple[list[Sample], list[Sample]]:
        """Train goods and test goods: from their own folder, or a seeded split of the normal."""
        normal = good_samples(require_images(self.normal_dir, "normal images (data.normal_dir)"))
        if self.normal_test_dir is not None:
            test = require_images(self.normal_test_dir, "normal test images (data.normal_test_dir)")
            return normal, good_samples(test)
        count = round(len(normal) * self.normal_split)
        if not 0 < count < len(normal):
            raise ValueError(
                f"data.normal_split={self.normal_split} of {len(normal)} normal images leaves "
                "no test or no train images; change it or set data.normal_test_dir"
            )
        test, train = seeded_split(normal, count, self.split_seed)
        return train, test
