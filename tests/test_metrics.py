"""Metrics against scikit-learn and hand-made cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

from patchlab.core.metrics import aupro, auroc, evaluate, f1_max


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
        metrics = evaluate(scores, labels, maps, masks)
    assert np.isnan(metrics["image_auroc"]) and np.isnan(metrics["pixel_auroc"])
    assert np.isnan(metrics["aupro"])
