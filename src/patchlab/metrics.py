"""Image and pixel metrics: AUROC, F1-max and AUPRO, on crop-resolution maps."""

import warnings

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_auroc


def _both_classes(labels: torch.Tensor, name: str) -> bool:
    positives = int(labels.sum())
    if 0 < positives < labels.numel():
        return True
    warnings.warn(f"{name} is NaN: the test set has only one class", stacklevel=3)
    return False


def unit_range(scores: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Min-max scales to [0, 1] in float64: torchmetrics would squash raw distances by sigmoid."""
    scores = scores.flatten().double()
    low, high = float(scores.min()), float(scores.max())
    return (scores - low) / max(high - low, 1e-12), low, high


def auroc(scores: torch.Tensor, labels: torch.Tensor, name: str = "auroc") -> float:
    """Area under the ROC curve; NaN with a warning when only one class is present."""
    if not _both_classes(labels, name):
        return float("nan")
    return float(binary_auroc(unit_range(scores)[0], labels.flatten().long()))


def f1_max(scores: torch.Tensor, labels: torch.Tensor, name: str = "f1_max") -> tuple[float, float]:
    """Best F1 over all thresholds, and that threshold (the seed's optimistic "F1-max").

    Exact, from one sort: the threshold returned is an actual score, and `scores >= threshold`
    reproduces the F1 to the last pixel, which tuning relies on to compare against it.
    """
    if not _both_classes(labels, name):
        return float("nan"), float("nan")
    scores, order = scores.flatten().sort(descending=True)
    positive = labels.flatten()[order].bool()
    true_pos = positive.cumsum(0, dtype=torch.int32)  # int32: half the memory on 4M pixels
    false_pos = (~positive).cumsum(0, dtype=torch.int32)
    last_of_tie = torch.ones_like(positive)
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    true_pos, false_pos = true_pos[last_of_tie].double(), false_pos[last_of_tie].double()
    f1 = 2 * true_pos / (true_pos + false_pos + true_pos[-1])
    best = int(f1.argmax())
    return float(f1[best]), float(scores[last_of_tie][best])


def aupro(
    maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3, steps: int = 301
) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` FPR, normalised to [0, 1].

    Thresholds are read off the sorted normal-pixel scores so the FPR grid is exact; each
    defect region (8-connected component of a mask) counts once, whatever its size.
    """
    if not _both_classes(masks, "aupro"):
        return float("nan")
    normal = maps[masks == 0].sort().values
    # A pixel is flagged when its score exceeds the threshold; the k-th largest normal score
    # as threshold flags at most k normal pixels, exactly k when there are no ties.
    fpr = torch.linspace(0, fpr_limit, steps, dtype=torch.float64)
    above = (fpr * normal.numel()).round().long()
    thresholds = normal[normal.numel() - 1 - above]
    overlaps = []
    for image_map, mask in zip(maps, masks, strict=True):
        if not mask.any():
            continue
        regions, count = ndimage.label(mask.numpy(), structure=np.ones((3, 3)))
        regions = torch.from_numpy(regions)
        for region in range(1, count + 1):
            scores = image_map[regions == region].sort().values
            below = torch.searchsorted(scores, thresholds, right=True)
            overlaps.append(1 - below.double() / scores.numel())
    pro = torch.stack(overlaps).mean(0)
    return float(torch.trapezoid(pro, fpr) / fpr_limit)


def evaluate(
    image_scores: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor | None,
) -> dict[str, float]:
    """All test metrics of one category, keyed by the names used in metrics.json and MLflow.

    Without `masks` (image-only data) the pixel metrics are left out, not set to NaN or 0.
    """
    image_f1, image_threshold = f1_max(image_scores, labels, "image_f1_max")
    metrics = {
        "image_auroc": auroc(image_scores, labels, "image_auroc"),
        "image_f1_max": image_f1,
        "image_f1_max_threshold": image_threshold,
    }
    if masks is None:
        return metrics
    pixel_f1, pixel_threshold = f1_max(maps, masks, "pixel_f1_max")
    return metrics | {
        "pixel_auroc": auroc(maps, masks, "pixel_auroc"),
        "pixel_f1_max": pixel_f1,
        "pixel_f1_max_threshold": pixel_threshold,
        "aupro": aupro(maps, masks),
    }
