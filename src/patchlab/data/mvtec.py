"""Scans and checks an MVTec AD layout category, then serves its images and masks.

Layout: `<root>/<category>/train/good/*`, `<root>/<category>/test/<type>/*` and
`<root>/<category>/ground_truth/<type>/<stem>_mask.png` for every defect type but `good`.
Without a `ground_truth/` folder the category is image-only: defect images carry no mask.
The listing, checking and mask pairing here serve every layout (see `FolderDataModule`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from patchlab.data.preprocessing import Preprocessing
from patchlab.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GOOD = "good"
WIDE_GRAY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Sample:
    """One image on disk; `mask` is None for good images and in image-only data. `size` is
    (height, width) once upright, as the scan read it."""

    image: Path
    defect_type: str
    mask: Path | None = None
    size: tuple[int, int] | None = None

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)

    @property
    def mask_known(self) -> bool:
        """Whether its pixels are labelled: a good image's mask is known to be empty."""
        return self.mask is not None or self.label == 0


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def require_images(folder: Path, what: str) -> list[Path]:
    """Image files in `folder`, failing early when it is missing or empty."""
    images = list_images(folder) if folder.is_dir() else []
    if not images:
        raise ValueError(f"No {what}: {folder} is missing or has no image files")
    return images


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) once upright, from the file's header alone.

    A file that is no image, or that Pillow refuses as a decompression bomb, fails here naming
    it; the pixels are decoded once, when the run reads them, and a truncated file fails then,
    naming it too. A PNG's EXIF orientation counts when its eXIf chunk precedes the pixels
    (finding a later one would mean decoding the image).
    """
    try:
        with Image.open(path) as image:
            size = image.size
            if image.format == "PNG":
                exif = Image.Exif()
                if image.info.get("exif"):
                    exif.load(image.info["exif"])
            else:
                exif = image.getexif()  # JPEG, TIFF: read from the header
            turned = exif.get(EXIF_ORIENTATION, 1) in TRANSPOSED
    except Image.DecompressionBombError as error:
        raise UserError(f"Refused image file {path}: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise UserError(f"Unreadable or corrupt image file {path}: {error}") from error
    return (size[1], size[0]) if turned else size


def upright_size(path: Path) -> tuple[int, int]:
    """(height, width) once upright, from the header (see `image_size`)."""
    width, height = image_size(path)
    return height, width


def good_samples(images: list[Path]) -> list[Sample]:
    """Good samples of `images`, each with its size from its header."""
    return [Sample(path, GOOD, size=upright_size(path)) for path in images]


def pair_masks(images: list[Path], defect_type: str, mask_dir: Path | None) -> list[Sample]:
    """Defect samples, each with its `<stem>_mask.*` or `<stem>.*` mask from `mask_dir`.

    `mask_dir` None means image-only data; otherwise every image needs a mask of its size.
    """
    if mask_dir is None:
        return [Sample(path, defect_type, size=upright_size(path)) for path in images]
    masks = (
        {p.stem.removesuffix("_mask"): p for p in list_images(mask_dir)}
        if mask_dir.is_dir()
        else {}
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
        mask, size = masks[path.stem], upright_size(path)
        if upright_size(mask) != size:
            raise ValueError(
                f"Mask {mask} is {upright_size(mask)} but its image {path} is {size} (H, W)"
            )
        samples.append(Sample(path, defect_type, mask, size))
    return samples


def seeded_split(samples: list[Sample], count: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded random pick of `count` samples, and the rest, both in their original order."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    picked = set(order[:count].tolist())
    return (
        [s for i, s in enumerate(samples) if i in picked],
        [s for i, s in enumerate(samples) if i not in picked],
    )


def scan_train(category_dir: Path) -> list[Sample]:
    """Lists train/good, failing early when it is missing or empty."""
    return good_samples(require_images(category_dir / "train" / GOOD, "training images"))


def scan_test(category_dir: Path) -> list[Sample]:
    """Lists test/<type>/* and pairs each defect image with its mask, checking sizes.

    No `ground_truth/` folder at all makes the category image-only; a partial one is an error.
    """
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise ValueError(f"No test split: {test_dir} does not exist")
    truth = category_dir / "ground_truth"
    samples = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = list_images(type_dir)
        if type_dir.name == GOOD:
            samples += good_samples(images)
        else:
            mask_dir = truth / type_dir.name if truth.is_dir() else None
            samples += pair_masks(images, type_dir.name, mask_dir)
    if not samples:
        raise ValueError(f"No test images under {test_dir}")
    return samples


def _eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit grayscale scaled to 8 bits (converting directly would clip at 255);
    palette images with transparency go through RGBA, as Pillow asks."""
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA")
    if image.mode not in WIDE_GRAY:
        return image
    array = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(array / 257.0, 0, 255).round().astype(np.uint8), "L")


def decode_image(source: Path | BinaryIO, name: str, mode: str = "RGB") -> torch.Tensor:
    """(C, H, W) uint8 from a file or file-like object, upright as its EXIF says (phone
    photos); palette, CMYK, RGBA (alpha dropped) and 16-bit gray become `mode`. Whatever
    cannot be decoded, including an image over Pillow's MAX_IMAGE_PIXELS (a decompression
    bomb), raises a ValueError that names `name`."""
    try:
        with Image.open(source) as image:
            upright = _eight_bit(ImageOps.exif_transpose(image))
            return v2.functional.pil_to_tensor(upright.convert(mode))
    except Image.DecompressionBombError as error:
        raise UserError(f"Refused image file {name}: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"Unreadable or corrupt image file {name}: {error}") from error


def read_image(path: Path, mode: str = "RGB") -> torch.Tensor:
    """(C, H, W) uint8 tensor of an image file; any error names the file."""
    return decode_image(path, str(path), mode)


class MVTecDataset(Dataset):
    """Decodes samples to (3, H, W) normalised images, (H, W) {0, 1} masks and (H, W) `valid`
    pixels (not padding, not ignored).

    A defect without a mask gets an all-zero one and `mask_known` False, so pixel metrics
    can tell "no defect pixels" from "not labelled".
    """

    def __init__(self, samples: list[Sample], preprocessing: Preprocessing) -> None:
        self.samples = samples
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        raw = read_image(sample.image)
        image = self.preprocessing.image(raw)
        valid = self.preprocessing.valid(tuple(raw.shape[-2:]))
        if sample.mask is None:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        else:
            mask = self.preprocessing.mask(read_image(sample.mask, "L"))
        return {
            "image": image,
            "mask": mask,
            "valid": valid,
            "mask_known": sample.mask_known,
            "label": sample.label,
            "index": index,
        }
