"""Exact confusion counts at every distinct score, from one sort: what every threshold-based
metric and curve reads, for a whole test set and the parts of its split."""

from dataclasses import dataclass

import numpy as np
import torch


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
        fpr, tpr = torch.zeros(len(self.thresholds) + 1), torch.zeros(len(self.thresholds) + 1)
        torch.div(self.false_pos, max(self.negatives, 1), out=fpr[1:])
        torch.div(self.true_pos, max(self.positives, 1), out=tpr[1:])
        return fpr, tpr

    def pr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(recall, precision) from recall 1 down to the (0, 1) end point."""
        count = len(self.thresholds)
        recall, precision = torch.zeros(count + 1), torch.ones(count + 1)
        for lo, hi in chunks(count):  # written reversed, chunk by chunk: no whole-curve copies
            true_pos = self.true_pos[lo:hi]
            flagged = true_pos + self.false_pos[lo:hi]
            recall[count - hi : count - lo] = (true_pos / max(self.positives, 1)).flip(0)
            precision[count - hi : count - lo] = (true_pos / flagged).flip(0)
        return recall, precision

    def auroc(self) -> float:
        """Trapezoidal area from the exact integer counts, summed exactly in int64; NaN for
        one class. Chunked: whole-curve float64 copies of a category's 4M pixels were over
        100 MB, a run's peak memory."""
        if self.positives == 0 or self.negatives == 0:
            return float("nan")
        twice_area, fp_before, tp_before = 0, 0, 0
        for lo, hi in chunks(len(self.thresholds)):
            false_pos, true_pos = self.false_pos[lo:hi].long(), self.true_pos[lo:hi].long()
            width = false_pos.diff(prepend=torch.tensor([fp_before]))
            height = true_pos + torch.cat([torch.tensor([tp_before]), true_pos[:-1]])
            twice_area += int((width * height).sum())
            fp_before, tp_before = int(false_pos[-1]), int(true_pos[-1])
        return twice_area / 2 / (self.positives * self.negatives)

    def f1_max(self) -> tuple[float, float]:
        """Best F1 and the score that reaches it: `scores >= threshold` reproduces it exactly.
        Ties go to the highest threshold (the first in this order)."""
        if self.positives == 0:
            return float("nan"), float("nan")
        best, where = -1.0, 0
        for lo, hi in chunks(len(self.thresholds)):
            true_pos = self.true_pos[lo:hi]
            f1 = 2 * true_pos.double() / (true_pos + self.false_pos[lo:hi] + self.positives)
            index = int(f1.argmax())
            if float(f1[index]) > best:
                best, where = float(f1[index]), lo + index
        return best, float(self.thresholds[where])


def chunks(count: int, size: int = 1 << 20) -> list[tuple[int, int]]:
    """[lo, hi) ranges that walk `count` items `size` (a million) at a time: a category's
    pixel curves are read in these, never copied whole in float64."""
    return [(lo, min(lo + size, count)) for lo in range(0, count, size)]


ALL = "all"  # the whole test set, beside the named parts of a split


def _counted(scores: torch.Tensor, positive: torch.Tensor) -> RankedCounts:
    """Counts at every distinct score of descending `scores`, with their `positive` flags."""
    true_pos = positive.cumsum(0, dtype=torch.int32)
    false_pos = positive.logical_not().cumsum(0, dtype=torch.int32)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    keep = last_of_tie.numpy()
    positives, negatives = int(true_pos[-1]), int(false_pos[-1])
    distinct = [torch.from_numpy(t.numpy()[keep]) for t in (scores, true_pos, false_pos)]
    return RankedCounts(*distinct, positives, negatives)


def rank_parts(
    scores: torch.Tensor,
    labels: torch.Tensor,
    parts: dict[str, torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, RankedCounts]:
    """Sorts (N, ...) scores once; counts for all of them ("all") and for each part.

    A part is a tensor of image indices (along the first axis), e.g. the validation half of
    a split. Its counts come from the same sort: the part's scores in that order are its own
    descending order, and counts at each distinct score do not depend on how ties are ordered.
    Elements outside `valid` (pixels not scored) are in no count. Selections go through numpy:
    torch's boolean indexing first builds int64 indices, which on 4M pixels is a 33 MB
    transient per selection.
    """
    if scores.dtype != torch.float64:  # float64 input keeps its precision; maps are float32
        scores = scores.float()
    per_image = scores[0].numel() if len(scores) else 1
    flat, truth, where = scores.flatten(), labels.flatten(), None
    if valid is not None:
        keep = valid.flatten().numpy()
        where = torch.from_numpy(keep.nonzero()[0])  # each kept element's flat position
        flat, truth = torch.from_numpy(flat.numpy()[keep]), torch.from_numpy(truth.numpy()[keep])
    # numpy's argsort (vectorised where the CPU has AVX-512) took a third of torch's 0.38 s on
    # bottle's 4M pixels; reversed, ties come in another order, which no count depends on.
    order = np.argsort(flat.numpy())[::-1]
    ordered = torch.from_numpy(flat.numpy()[order])
    positive = torch.from_numpy(truth.numpy()[order]).bool()
    member = None
    if parts:
        owner = np.zeros(len(scores), dtype=np.int8)
        for number, index in enumerate(parts.values(), start=1):
            owner[index.numpy()] = number
        member = owner[(order if where is None else where.numpy()[order]) // per_image]
    del order, where  # int64, the largest buffers: free them before the next allocations
    ranked = {ALL: _counted(ordered, positive)}
    for number, name in enumerate(parts or {}, start=1):
        chosen = member == number
        ranked[name] = _counted(
            torch.from_numpy(ordered.numpy()[chosen]), torch.from_numpy(positive.numpy()[chosen])
        )
    return ranked


def rank(
    scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None
) -> RankedCounts:
    """Sorts scores once and counts positives and negatives above each distinct score."""
    return rank_parts(scores, labels, valid=valid)[ALL]
