"""Image and pixel metrics: AUROC, F1-max and AUPRO, on input-resolution maps."""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from patchlab.core.outputs import TestOutputs
from patchlab.core.ranking import ALL, RankedCounts, rank, rank_parts


def _both_classes(labels: torch.Tensor, name: str) -> bool:
    positives = int(labels.sum())
    return _warn_unless(0 < positives < labels.numel(), name)


def _both_classes_counted(counts: RankedCounts, name: str) -> bool:
    return _warn_unless(counts.positives > 0 and counts.negatives > 0, name)


def _warn_unless(both: bool, name: str) -> bool:
    if not both:
        warnings.warn(f"{name} is NaN: the test set has only one class", stacklevel=4)
    return both


def auroc(scores: torch.Tensor, labels: torch.Tensor, name: str = "auroc") -> float:
    """Area under the ROC curve; NaN with a warning when only one class is present."""
    if not _both_classes(labels, name):
        return float("nan")
    return rank(scores, labels).auroc()


def f1_max(scores: torch.Tensor, labels: torch.Tensor, name: str = "f1_max") -> tuple[float, float]:
    """Best F1 over all thresholds, and that threshold (the seed's optimistic "F1-max")."""
    if not _both_classes(labels, name):
        return float("nan"), float("nan")
    return rank(scores, labels).f1_max()


def aupro(
    maps: torch.Tensor,
    masks: torch.Tensor,
    ranked: RankedCounts | None = None,
    fpr_limit: float = 0.3,
    steps: int = 301,
) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` FPR, normalised to [0, 1].

    Thresholds are normal-pixel scores read off the ranking (`rank(maps, masks)`, passed in
    when the caller has it), so the FPR grid is exact; each defect region (8-connected
    component of a mask) counts once, whatever its size.
    """
    if not _both_classes(masks, "aupro"):
        return float("nan")
    ranked = ranked if ranked is not None else rank(maps, masks)
    # A pixel is flagged when its score exceeds the threshold; the k-th largest normal score
    # as threshold flags at most k - 1 normal pixels above it, exactly that without ties. The
    # k-th largest normal score is the first distinct score with k normal pixels at or above.
    fpr = torch.linspace(0, fpr_limit, steps, dtype=torch.float64)
    kth = (fpr * ranked.negatives).round().long() + 1
    thresholds = ranked.thresholds[torch.searchsorted(ranked.false_pos.long(), kth)]
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


@dataclass(frozen=True)
class Evaluation:
    """A category's metrics, and the rankings they came from, for figures and tuning to reuse.

    `image` and `pixel` are keyed "all" and by part name; `pixel` is empty without masks.
    """

    metrics: dict[str, float]
    image: dict[str, RankedCounts]
    pixel: dict[str, RankedCounts]


def evaluate(
    image_scores: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor | None,
    parts: dict[str, torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
) -> Evaluation:
    """All test metrics of one category, keyed by the names used in metrics.json and MLflow.

    Without `masks` (image-only data) the pixel metrics are left out, not set to NaN or 0.
    Each of `parts` (image indices, e.g. a validation split) adds `<part>_<metric>` figures
    from the same sorts. Pixels outside (N, H, W) `valid` (padding, ignored regions) are in
    no pixel metric; `masks` must be 0 there.
    """
    parts = parts or {}
    valid = None if valid is None or bool(valid.all()) else valid
    image = rank_parts(image_scores, labels, parts)
    pixel = rank_parts(maps, masks, parts, valid) if masks is not None else {}
    metrics = _metrics(image[ALL], pixel.get(ALL), maps, masks)
    for name, index in parts.items():
        part_maps, part_masks = (maps[index], masks[index]) if masks is not None else (maps, None)
        metrics |= prefixed(name, _metrics(image[name], pixel.get(name), part_maps, part_masks))
    return Evaluation(metrics, image, pixel)


def evaluate_outputs(
    outputs: TestOutputs, parts: dict[str, torch.Tensor] | None = None
) -> Evaluation:
    """`evaluate` on a test pass: pixel metrics only where it has masks, on scored pixels."""
    masks = outputs.masks if outputs.pixel_labelled else None
    image_scores, labels, maps = outputs.image_scores, outputs.labels, outputs.maps
    return evaluate(image_scores, labels, maps, masks, parts, outputs.valid)


def prefixed(part: str, metrics: dict[str, float]) -> dict[str, float]:
    """A part's threshold-free metrics, named `<part>_<metric>` (`val_pixel_auroc`, ...).

    Model selection reads the `val_` ones; the `held_out_` ones report what was chosen on
    images no choice has seen.
    """
    return {f"{part}_{k}": v for k, v in metrics.items() if not k.endswith("_threshold")}


def _metrics(
    image: RankedCounts,
    pixel: RankedCounts | None,
    maps: torch.Tensor,
    masks: torch.Tensor | None,
) -> dict[str, float]:
    metrics = _threshold_metrics("image", image)
    if pixel is None:
        return metrics
    return metrics | _threshold_metrics("pixel", pixel) | {"aupro": aupro(maps, masks, pixel)}


def _threshold_metrics(prefix: str, counts: RankedCounts) -> dict[str, float]:
    """AUROC and F1-max from the ranking; NaN with a warning when only one class is present."""
    auc = f1 = threshold = float("nan")
    if _both_classes_counted(counts, f"{prefix}_auroc"):
        auc, (f1, threshold) = counts.auroc(), counts.f1_max()
    return {
        f"{prefix}_auroc": auc,
        f"{prefix}_f1_max": f1,
        f"{prefix}_f1_max_threshold": threshold,
    }


def precision_recall_f1(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of boolean decisions over all elements: pixels or images."""
    truth = truth.bool()
    tp = int(torch.count_nonzero(predicted & truth))
    fp = int(torch.count_nonzero(predicted)) - tp
    fn = int(torch.count_nonzero(truth)) - tp
    return {
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
    }
