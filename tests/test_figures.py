"""Figures and the report: right files and sizes, headless, deterministic, numbers from MLflow."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from helpers.configs import ROOT, tracked
from patchlab.core.metrics import rank
from patchlab.reporting.render import load_run, render_run
from patchlab.reporting.report import WORST_CASES, build_report
from patchlab.reporting.run_figures import CURVE_POINTS, RUN_FIGURES, _curve
from patchlab.reporting.summary import TABLE_METRICS

EXPECTED_SIZES = {  # (width, height) in pixels: figure inches x dpi
    "figures/score_distributions.png": (720, 342),
    "figures/roc_curves.png": (540, 495),
    "figures/operating_characteristic.png": (585, 540),
    "figures/pr_curve.png": (540, 495),
    "figures/failure_cases.png": (1188, 450),
}


def test_drawn_curves_are_thinned_from_the_exact_ones() -> None:
    """A pixel-sized input: a few hundred points to draw, still tracing the exact curve."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.rand(300_000, generator=generator) < 0.05
    scores = torch.randn(300_000, generator=generator) + 2.5 * labels
    counts = rank(scores, labels)
    fpr, tpr = _curve(counts, "roc")
    assert 100 < len(fpr) <= CURVE_POINTS + 2
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    recall, precision = _curve(counts, "pr")
    assert 100 < len(recall) <= CURVE_POINTS + 2 and recall[0] == 1 and recall[-1] == 0
    area = -np.trapezoid(precision, recall)
    assert area == pytest.approx(average_precision_score(labels, scores), abs=5e-3)


@pytest.fixture(scope="module")
def tracked_run_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("figures")
    tracked(
        [
            f"data.root={synthetic_root}",
            f"tracking.root={base}/mlruns",
            "threshold=optuna",
            "threshold.n_trials=10",
        ],
        base / "run",
    )
    return base


def test_every_figure_is_written_at_its_size(tracked_run_dir: Path) -> None:
    run_dir = tracked_run_dir / "run"
    for name, size in EXPECTED_SIZES.items():
        assert Image.open(run_dir / name).size == size, name
    heatmaps = sorted((run_dir / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 8  # figures.count of the 9 test images
    assert all(Image.open(p).size == (880, 304) for p in heatmaps)
    assert heatmaps[0].name.startswith("000_") and "good" in heatmaps[1].name


def test_rendering_is_headless_and_deterministic(
    tracked_run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bytes from the command, in process, and with no second process to draw in."""
    run_dir = tracked_run_dir / "run"
    before = {p: p.read_bytes() for p in run_dir.glob("*/*.png") if p.parent.name != "tuning"}
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"} | {"MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", "patchlab.render", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    after = {p: p.read_bytes() for p in before}
    assert after == before
    render_run(run_dir, *load_run(run_dir))
    assert {p: p.read_bytes() for p in before} == before
    monkeypatch.setattr(sys, "platform", "darwin")  # drawn in turn
    render_run(run_dir, *load_run(run_dir))
    assert {p: p.read_bytes() for p in before} == before


def test_report_table_equals_the_metrics_in_mlflow(tracked_run_dir: Path) -> None:
    client = MlflowClient(f"sqlite:///{tracked_run_dir / 'mlruns' / 'mlflow.db'}")
    table, markdown, page = build_report(client, "patchcore", tracked_run_dir / "report")
    (run,) = client.search_runs([client.get_experiment_by_name("patchcore").experiment_id])
    for metric in TABLE_METRICS:
        logged = run.data.metrics[metric]
        assert table.loc["bottle", metric] == logged or (
            math.isnan(logged) and math.isnan(table.loc["bottle", metric])
        )
    assert f"runs/{run.info.run_id}" in markdown.read_text()
    text = page.read_text()
    # the summary's two, the run's figures, then its worst cases as heatmaps with masks
    assert text.count("data:image/png;base64,") == 2 + len(RUN_FIGURES) + WORST_CASES
    assert f"{table.loc['bottle', 'image_auroc']:.4f}" in markdown.read_text()
    threshold = run.data.metrics["image_threshold"]
    assert f"operating point f1, image threshold {threshold:.6g}" in markdown.read_text()
    for shown in ("recall of scratch", "recall of stain", "false-reject rate", "95% CI"):
        assert shown in text and shown in markdown.read_text()
    assert "_heatmaps_000_" in markdown.read_text()


def test_a_run_with_figures_off_draws_nothing(synthetic_root: Path, tmp_path: Path) -> None:
    metrics = tracked([f"data.root={synthetic_root}", "figures.enabled=false"], tmp_path / "run")
    assert metrics["image_auroc"] >= 0
    assert (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "heatmaps").exists()
    assert not (tmp_path / "run" / "figures").exists()


def test_a_run_imports_optuna_and_mlflow_model_code_only_when_used() -> None:
    """What an untuned run imports; optuna, numba and MLflow's pyfunc cost seconds in all."""
    code = (
        "import sys, patchlab.jobs.train, patchlab.jobs.pipeline, patchlab.jobs.tracking;"
        "print([m for m in ('optuna', 'numba', 'mlflow.pyfunc', 'seaborn') if m in sys.modules])"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
