"""Where a part's pixels go: from the file's size to the model's input, and back.

A geometry maps every image (and its masks) to one model input size, says which input pixels
show the image (padding does not), and maps anomaly maps back to the file's size with NaN
wherever nothing was scored: outside a crop, in padding. Nothing is ever filled in.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from patchlab.errors import SettingError, check_limits

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Placement:
    """How one image of `source` size lands in the input: resized to `resized`, then shifted
    by `shift` (negative for a crop, positive for padding) inside an input of `size`."""

    source: Size
    resized: Size
    shift: Size
    size: Size

    def content(self) -> tuple[slice, slice]:
        """The input rows and columns that show the image."""
        (dy, dx), (h, w), (height, width) = self.shift, self.resized, self.size
        return slice(max(dy, 0), min(dy + h, height)), slice(max(dx, 0), min(dx + w, width))

    def kept_share(self) -> float:
        """The share of the image's area the input shows."""
        rows, cols = self.content()
        return (rows.stop - rows.start) * (cols.stop - cols.start) / math.prod(self.resized)


class Geometry:
    """Maps images of any size to one input size; subclasses choose how."""

    def size(self) -> Size:
        """(H, W) of the model input."""
        raise NotImplementedError

    def describe(self) -> str:
        """How tables show it: `256/224` (resize/crop), `resize 224x560`, `fit 224x560`."""
        height, width = self.size()
        return f"{type(self).__name__.lower()} {height}x{width}"

    def label(self) -> str:
        """How run names show it: the input size."""
        height, width = self.size()
        return f"{height}x{width}px"

    def place(self, source: Size) -> Placement:
        raise NotImplementedError

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """(C, H0, W0) uint8 -> (C, H, W) uint8, antialiased; padding is 0."""
        return self._fill(image, v2.InterpolationMode.BILINEAR)

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(1, H0, W0) -> (1, H, W), nearest; padding is 0."""
        return self._fill(mask, v2.InterpolationMode.NEAREST)

    def _fill(self, image: torch.Tensor, mode: v2.InterpolationMode) -> torch.Tensor:
        place = self.place(tuple(image.shape[-2:]))
        resized = v2.functional.resize(image, list(place.resized), mode, antialias=True)
        out = image.new_zeros((*image.shape[:-2], *place.size))
        rows, cols = place.content()
        (dy, dx) = place.shift
        source_rows = slice(rows.start - dy, rows.stop - dy)
        source_cols = slice(cols.start - dx, cols.stop - dx)
        out[..., rows, cols] = resized[..., source_rows, source_cols]
        return out

    def valid(self, source: Size) -> torch.Tensor:
        """(H, W) bool: the input pixels that show the image."""
        place = self.place(source)
        valid = torch.zeros(place.size, dtype=torch.bool)
        valid[place.content()] = True
        return valid

    def to_source(self, maps: torch.Tensor, source: Size, nearest: bool = False) -> torch.Tensor:
        """(H, W) input-resolution map -> (H0, W0), NaN where the input did not show the image.

        Each source pixel samples, bilinearly (or `nearest` for masks), the part of the input
        that shows the image, so padding never bleeds into it; source pixels outside what the
        input shows (cut off by a crop) get NaN.
        """
        place = self.place(source)
        (h, w), (dy, dx) = place.resized, place.shift
        rows, cols = place.content()
        content = maps[rows, cols].float()
        y = (torch.arange(source[0], dtype=torch.float64) + 0.5) * (h / source[0]) - 0.5 + dy
        x = (torch.arange(source[1], dtype=torch.float64) + 0.5) * (w / source[1]) - 0.5 + dx
        y, x = y - rows.start, x - cols.start  # in the content's own pixels
        inside_y = (y >= -0.5) & (y <= content.shape[0] - 0.5)
        inside_x = (x >= -0.5) & (x <= content.shape[1] - 0.5)
        grid_y = ((2 * y + 1) / content.shape[0] - 1).float()
        grid_x = ((2 * x + 1) / content.shape[1] - 1).float()
        grid = torch.stack(torch.meshgrid(grid_x, grid_y, indexing="xy"), dim=-1)[None]
        mode = "nearest" if nearest else "bilinear"
        sampled = F.grid_sample(content[None, None], grid, mode, "border", align_corners=False)
        return sampled[0, 0].masked_fill(~(inside_y[:, None] & inside_x[None, :]), float("nan"))


class CenterCrop(Geometry):
    """The seed's recipe: the short side resized to `resize`, then the centre `crop_size`
    square. Keeps MVTec results comparable; on other aspect ratios it drops the ends.

    Args:
        resize: Short side after resizing, in pixels.
        crop_size: Side of the centre square the model sees.
    """

    LIMITS: ClassVar = {
        "resize": [(">", 0)],
        "crop_size": [(">", 0), ("<=", "resize")],
    }  # a literal for the preflight

    def __init__(self, resize: int = 256, crop_size: int = 224) -> None:
        check_limits(self.LIMITS, locals())
        self.resize, self.crop_size = resize, crop_size
        self._steps = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop_size)])
        self._mask_steps = v2.Compose(
            [
                v2.Resize(resize, interpolation=v2.InterpolationMode.NEAREST),
                v2.CenterCrop(crop_size),
            ]
        )

    def size(self) -> Size:
        return self.crop_size, self.crop_size

    def describe(self) -> str:
        return f"{self.resize}/{self.crop_size}"

    def label(self) -> str:
        return f"{self.crop_size}px"

    def place(self, source: Size) -> Placement:
        height, width = source
        short, long = sorted(source)
        scaled_long = int(self.resize * long / short)  # torchvision's Resize(int)
        resized = (self.resize, scaled_long) if height <= width else (scaled_long, self.resize)
        shift = tuple(-round((side - self.crop_size) / 2.0) for side in resized)
        return Placement(source, resized, shift, self.size())

    def image(self, image: torch.Tensor) -> torch.Tensor:
        return self._steps(image)

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        return self._mask_steps(mask)


class FixedSize(Geometry):
    """A geometry whose model input is one given [height, width] for every image.

    Args:
        size: [height, width] of the model input.
    """

    LIMITS: ClassVar = {"size": [("is", "[height, width]")]}  # a literal for the preflight

    def __init__(self, size: Sequence[int]) -> None:
        check_limits(self.LIMITS, {"size": list(size)})
        self.shape = int(size[0]), int(size[1])

    def size(self) -> Size:
        return self.shape


class Resize(FixedSize):
    """The whole image resized to `size`, aspect ratio not kept."""

    def place(self, source: Size) -> Placement:
        return Placement(source, self.shape, (0, 0), self.shape)


class Fit(FixedSize):
    """The whole image scaled to fit inside `size`, aspect ratio kept, centred and padded.

    For mixed sizes and aspect ratios: every image keeps its shape, and the padding is never
    scored, never in the bank and never in a metric.
    """

    def place(self, source: Size) -> Placement:
        scale = min(self.shape[0] / source[0], self.shape[1] / source[1])
        resized = tuple(
            min(max(1, round(s * scale)), b) for s, b in zip(source, self.shape, strict=True)
        )
        shift = tuple((b - r) // 2 for b, r in zip(self.shape, resized, strict=True))
        return Placement(source, resized, shift, self.shape)


GEOMETRIES = {f"{__name__}.{cls.__name__}": cls for cls in (CenterCrop, Resize, Fit)}


def geometry_from(node: dict) -> Geometry:
    """A geometry from its config node (`_target_` and arguments), for files read back later;
    only the classes above are built."""
    settings = {k: v for k, v in node.items() if not k.startswith("_")}
    target = node.get("_target_")
    if target not in GEOMETRIES:
        raise SettingError(f"{{geometry}} must name one of {sorted(GEOMETRIES)}, got {target!r}")
    return GEOMETRIES[target](**settings)
