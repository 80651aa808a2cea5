"""Scans and checks an MVTec AD layout category, then serves its images and masks.

Layout: `<root>/<category>/train/good/*`, `<root>/<category>/test/<type>/*` and
`<root>/<category>/ground_truth/<type>/<stem>_mask.png` for every defect type but `good`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image on disk; `mask` is None for good images."""

    image: Path
    defect_type: str
    mask: Path | None = None

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _size(path: Path) -> tuple[int, int]:
    """Reads the header and checks the whole file decodes, naming the file when it does not."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Unreadable or corrupt image file {path}: {error}") from error
    return size


def scan_train(category_dir: Path) -> list[Sample]:
    """Lists train/good, failing early when it is missing or empty."""
    folder = category_dir / "train" / GOOD
    if not folder.is_dir() or not _images(folder):
        raise ValueError(f"No training images: {folder} is missing or has no image files")
    samples = [Sample(path, GOOD) for path in _images(folder)]
    for sample in samples:
        _size(sample.image)
    return samples


def scan_test(category_dir: Path) -> list[Sample]:
    """Lists test/<type>/* and pairs each defect image with its mask, checking sizes."""
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise ValueError(f"No test split: {test_dir} does not exist")
    samples = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        samples += _scan_defect_type(category_dir, type_dir.name)
    if not samples:
        raise ValueError(f"No test images under {test_dir}")
    return samples


def _scan_defect_type(category_dir: Path, defect_type: str) -> list[Sample]:
    images = _images(category_dir / "test" / defect_type)
    if defect_type == GOOD:
        for path in images:
            _size(path)
        return [Sample(path, GOOD) for path in images]
    mask_dir = category_dir / "ground_truth" / defect_type
    masks = (
        {p.stem.removesuffix("_mask"): p for p in _images(mask_dir)} if mask_dir.is_dir() else {}
    )
    orphans = sorted(set(masks) - {p.stem for p in images})
    if orphans:
        raise ValueError(f"Masks without a test image in {mask_dir}: {orphans[:5]}")
    samples = []
    for path in images:
        if path.stem not in masks:
            raise ValueError(
                f"Defect image {path} has no mask; expected {mask_dir}/{path.stem}_mask.png"
            )
        mask = masks[path.stem]
        if _size(path) != _size(mask):
            raise ValueError(
                f"Mask {mask} is {_size(mask)} but its image {path} is {_size(path)} (W, H)"
            )
        samples.append(Sample(path, defect_type, mask))
    return samples


class ImageTransform:
    """Resize, center crop and normalise images; masks go through the same geometry, nearest."""

    def __init__(self, resize: int, crop_size: int, mean: list[float], std: list[float]) -> None:
        self.image = v2.Compose(
            [
                v2.Resize(resize, antialias=True),
                v2.CenterCrop(crop_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )
        self.mask = v2.Compose(
            [
                v2.Resize(resize, interpolation=v2.InterpolationMode.NEAREST),
                v2.CenterCrop(crop_size),
            ]
        )
        self.display = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop_size)])


def read_image(path: Path, mode: str = "RGB") -> torch.Tensor:
    """(C, H, W) uint8 tensor; any error names the file."""
    try:
        with Image.open(path) as image:
            array = v2.functional.pil_to_tensor(image.convert(mode))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Unreadable or corrupt image file {path}: {error}") from error
    return array


class MVTecDataset(Dataset):
    """Decodes samples to (3, S, S) normalised images and (S, S) {0, 1} masks."""

    def __init__(self, samples: list[Sample], transform: ImageTransform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = self.transform.image(read_image(sample.image))
        if sample.mask is None:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        else:
            mask = (self.transform.mask(read_image(sample.mask, "L"))[0] > 0).to(torch.uint8)
        return {"image": image, "mask": mask, "label": sample.label, "index": index}
