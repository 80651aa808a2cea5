"""Image and pixel metrics: AUROC, F1-max and AUPRO, on crop-resolution maps."""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


def _both_classes(labels: torch.Tensor, name: str) -> bool:
    positives = int(labels.sum())
    if 0 < positives < labels.numel():
        return True
    warnings.warn(f"{name} is NaN: the test set has only one class", stacklevel=3)
    return False


@dataclass(frozen=True)
class RankedCounts:
    """Exact confusion counts at every distinct score, from one descending sort.

    Everything threshold-based (AUROC, F1-max, the drawn ROC and PR curves) reads these, so a
    category's 4M pixels are sorted once, in their float32, with int32 counts.
    """

    thresholds: torch.Tensor  # (T,) distinct scores, descending
    true_pos: torch.Tensor  # (T,) positives scoring >= each threshold
    false_pos: torch.Tensor  # (T,) negatives scoring >= each threshold
    positives: int
    negatives: int

    def roc(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(FPR, TPR) from (0, 0) to (1, 1)."""
        zero = torch.zeros(1)
        fpr = torch.cat([zero, self.false_pos / max(self.negatives, 1)])
        tpr = torch.cat([zero, self.true_pos / max(self.positives, 1)])
        return fpr, tpr

    def pr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(recall, precision) from recall 1 down to the (0, 1) end point."""
        recall = (self.true_pos / max(self.positives, 1)).flip(0)
        precision = (self.true_pos / (self.true_pos + self.false_pos)).flip(0)
        return torch.cat([recall, torch.zeros(1)]), torch.cat([precision, torch.ones(1)])

    def auroc(self) -> float:
        """Trapezoidal area, summed in float64 from the exact integer counts; NaN for one class."""
        if self.positives == 0 or self.negatives == 0:
            return float("nan")
        zero = torch.zeros(1, dtype=torch.float64)
        false_pos = torch.cat([zero, self.false_pos.double()])
        true_pos = torch.cat([zero, self.true_pos.double()])
        return float(torch.trapezoid(true_pos, false_pos)) / (self.positives * self.negatives)

    def f1_max(self) -> tuple[float, float]:
        """Best F1 and the score that reaches it: `scores >= threshold` reproduces it exactly."""
        if self.positives == 0:
            return float("nan"), float("nan")
        f1 = 2 * self.true_pos.double() / (self.true_pos + self.false_pos + self.positives)
        best = int(f1.argmax())
        return float(f1[best]), float(self.thresholds[best])


def rank(scores: torch.Tensor, labels: torch.Tensor) -> RankedCounts:
    """Sorts scores once and counts positives and negatives above each distinct score.

    Selections go through numpy: torch's boolean indexing first builds int64 indices, which
    on 4M pixels is a 33 MB transient per selection.
    """
    if scores.dtype != torch.float64:  # float64 input keeps its precision; maps are float32
        scores = scores.float()
    scores, order = scores.flatten().sort(descending=True)
    positive = labels.flatten()[order].bool()
    del order  # int64, the largest buffer: free it before the next allocations
    true_pos = positive.cumsum(0, dtype=torch.int32)
    false_pos = positive.logical_not_().cumsum(0, dtype=torch.int32)
    del positive
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    keep = last_of_tie.numpy()
    positives, negatives = int(true_pos[-1]), int(false_pos[-1])
    distinct = [torch.from_numpy(t.numpy()[keep]) for t in (scores, true_pos, false_pos)]
    return RankedCounts(*distinct, positives, negatives)


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
    maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3, steps: int = 301
) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` FPR, normalised to [0, 1].

    Thresholds are read off the sorted normal-pixel scores so the FPR grid is exact; each
    defect region (8-connected component of a mask) counts once, whatever its size.
    """
    if not _both_classes(masks, "aupro"):
        return float("nan")
    # numpy: a boolean mask over (N, H, W) in torch first builds (pixels x 3) int64 indices.
    normal = torch.from_numpy(np.sort(maps.numpy()[masks.numpy() == 0]))
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
    metrics = _threshold_metrics("image", image_scores, labels)
    if masks is None:
        return metrics
    return metrics | _threshold_metrics("pixel", maps, masks) | {"aupro": aupro(maps, masks)}


def _threshold_metrics(prefix: str, scores: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """AUROC and F1-max from one sort; NaN with a warning when only one class is present."""
    auc = f1 = threshold = float("nan")
    if _both_classes(truth, f"{prefix}_auroc"):
        counts = rank(scores, truth)
        auc, (f1, threshold) = counts.auroc(), counts.f1_max()
    return {
        f"{prefix}_auroc": auc,
        f"{prefix}_f1_max": f1,
        f"{prefix}_f1_max_threshold": threshold,
    }


def precision_recall_f1(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of boolean decisions over all elements: pixels or images."""
    truth = truth.bool()
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    return {
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
    }
