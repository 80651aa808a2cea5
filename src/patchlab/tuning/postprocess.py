"""From anomaly-score grids to binary defect masks: blur, normalise, threshold, morphology."""

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchlab.core.outputs import TestOutputs
from patchlab.core.scoring import anomaly_maps


@dataclass(frozen=True)
class PostProcessing:
    """Everything needed to turn patch scores into a mask; travels with the memory bank."""

    sigma: float
    low: float  # validation-map minimum at this sigma: the normalisation's 0
    high: float  # validation-map maximum: its 1
    threshold: float  # on the normalised scale
    open_radius: int = 0
    close_radius: int = 0
    min_area: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def maps_at(outputs: TestOutputs, sigma: float) -> torch.Tensor:
    """(N, H, W) anomaly maps re-blurred at `sigma` from the cached patch scores; NaN where
    not scored, as in the test pass."""
    size, grid = tuple(outputs.masks.shape[-2:]), outputs.patch_scores
    if bool(outputs.valid.all()):
        return anomaly_maps(grid, size, sigma)
    maps = anomaly_maps(grid, size, sigma, ~torch.isnan(grid))
    return maps.masked_fill(~outputs.valid, float("nan"))


def value_range(maps: torch.Tensor) -> tuple[float, float]:
    """The lowest and highest scored value of `maps` (NaN, not scored, left out)."""
    return float(maps.nan_to_num(float("inf")).min()), float(maps.nan_to_num(float("-inf")).max())


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(masks, 2 * radius + 1, stride=1, padding=radius)


def _erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    return -F.max_pool2d(-masks, 2 * radius + 1, stride=1, padding=radius)


def remove_small_regions(masks: torch.Tensor, min_area: int) -> torch.Tensor:
    """Drops 8-connected components smaller than `min_area` pixels from (N, H, W) bool masks."""
    kept = []
    for mask in masks.numpy():
        regions, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(regions.ravel())
        keep = sizes >= min_area
        keep[0] = False
        kept.append(torch.from_numpy(keep[regions]))
    return torch.stack(kept)


def binarize(maps: torch.Tensor, post: PostProcessing) -> torch.Tensor:
    """(N, H, W) maps at `post.sigma` -> (N, H, W) bool masks."""
    normalised = (maps.double() - post.low) / max(post.high - post.low, 1e-12)
    masks = (normalised >= post.threshold).float().unsqueeze(1)
    if post.open_radius > 0:
        masks = _dilate(_erode(masks, post.open_radius), post.open_radius)
    if post.close_radius > 0:
        masks = _erode(_dilate(masks, post.close_radius), post.close_radius)
    masks = masks.squeeze(1) > 0.5
    return remove_small_regions(masks, post.min_area) if post.min_area > 0 else masks
