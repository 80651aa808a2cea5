"""Metrics against scikit-learn and hand-made cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

from patchlab.core.metrics import aupro, auroc, evaluate, f1_max
from patchlab.core.ranking import rank, rank_parts


def test_auroc_matches_sklearn_on_raw_distances() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(50, 5, 500) + 3 * labels  # raw distances, far outside [0, 1]
    expected = roc_auc_score(labels, scores)
    assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected, abs=1e-6)


def test_f1_max_matches_sklearn_and_returns_a_raw_threshold() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(10, 2, 400) + 2 * labels
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    f1, threshold = f1_max(torch.tensor(scores), torch.tensor(labels))
    assert f1 == pytest.approx(expected, abs=1e-6)
    predicted = scores >= threshold - 1e-9
    tp = np.sum(predicted & (labels == 1))
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(expected, abs=1e-6)


def test_curves_and_areas_read_in_chunks_equal_the_whole_curve_sums() -> None:
    """Pixel-sized input, 2.5M distinct scores: the chunked AUROC, F1-max, ROC and PR agree
    with scikit-learn and with the whole-curve expressions across chunk boundaries."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.rand(2_500_000, generator=generator) < 0.05
    scores = torch.randn(2_500_000, generator=generator) + 1.5 * labels
    counts = rank(scores, labels)
    assert len(counts.thresholds) > 2 * (1 << 20)
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert counts.auroc() == pytest.approx(expected, abs=1e-12)
    f1 = 2 * counts.true_pos.double() / (counts.true_pos + counts.false_pos + counts.positives)
    best = int(f1.argmax())
    assert counts.f1_max() == (float(f1[best]), float(counts.thresholds[best]))
    fpr, tpr = counts.roc()
    assert torch.equal(fpr, torch.cat([torch.zeros(1), counts.false_pos / counts.negatives]))
    assert torch.equal(tpr, torch.cat([torch.zeros(1), counts.true_pos / counts.positives]))
    recall, precision = counts.pr()
    flagged = counts.true_pos + counts.false_pos
    assert torch.equal(recall[:-1], (counts.true_pos / counts.positives).flip(0))
    assert torch.equal(precision[:-1], (counts.true_pos / flagged).flip(0))
    assert (recall[-1], precision[-1]) == (0, 1)


def test_aupro_is_one_for_a_perfect_map_and_counts_regions_equally() -> None:
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1  # small region
    masks[1, 10:30, 10:30] = 1  # large region
    assert aupro(masks.float(), masks) == pytest.approx(1.0)
    # Found only the large region: per-region overlap is 0.5 whatever the pixel counts say.
    found_large = masks.float().clone()
    found_large[0] = 0
    assert aupro(found_large, masks) == pytest.approx(0.5, abs=0.02)


def test_single_class_gives_nan_with_a_warning() -> None:
    scores, labels = torch.rand(10), torch.zeros(10, dtype=torch.long)
    maps, masks = torch.rand(10, 8, 8), torch.zeros(10, 8, 8, dtype=torch.uint8)
    with pytest.warns(UserWarning, match="only one class"):
        metrics = evaluate(scores, labels, maps, masks).metrics
    assert np.isnan(metrics["image_auroc"]) and np.isnan(metrics["pixel_auroc"])
    assert np.isnan(metrics["aupro"])


def test_one_sort_gives_every_parts_counts_as_its_own_sort() -> None:
    """The validation and held-out parts read their counts off the whole set's sort."""
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(12, 6, 6, generator=generator).round(decimals=2)  # many ties
    masks = (torch.rand(12, 6, 6, generator=generator) < 0.2).to(torch.uint8)
    parts = {"val": torch.tensor([0, 3, 4, 7, 8]), "held_out": torch.tensor([1, 2, 5, 6, 9])}
    ranked = rank_parts(maps, masks, parts)
    for name, index in parts.items():
        alone = rank(maps[index], masks[index])
        for field in ("thresholds", "true_pos", "false_pos"):
            assert torch.equal(getattr(ranked[name], field), getattr(alone, field)), field
    evaluation = evaluate(maps.amax((1, 2)), masks.amax((1, 2)), maps, masks, parts)
    alone = evaluate(
        maps.amax((1, 2))[parts["val"]],
        masks.amax((1, 2))[parts["val"]],
        maps[parts["val"]],
        masks[parts["val"]],
    ).metrics
    assert evaluation.metrics["val_pixel_auroc"] == alone["pixel_auroc"]
    assert evaluation.metrics["val_aupro"] == alone["aupro"]


def test_aupro_thresholds_from_the_ranking_equal_the_sorted_normal_scores() -> None:
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(6, 16, 16, generator=generator).round(decimals=3)
    masks = torch.zeros(6, 16, 16, dtype=torch.uint8)
    masks[:3, 4:9, 4:9] = 1
    normal = maps[masks == 0].sort().values
    fpr = torch.linspace(0, 0.3, 301, dtype=torch.float64)
    expected = normal[normal.numel() - 1 - (fpr * normal.numel()).round().long()]
    counts = rank(maps, masks)
    kth = (fpr * counts.negatives).round().long() + 1
    assert torch.equal(
        counts.thresholds[torch.searchsorted(counts.false_pos.long(), kth)], expected
    )
