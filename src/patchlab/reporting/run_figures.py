"""Per-run figures (seaborn), drawn from saved scores and maps: never re-runs the model."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

from patchlab.core.outputs import TestOutputs
from patchlab.core.ranking import RankedCounts, chunks, rank
from patchlab.data.mvtec import Sample, read_image
from patchlab.reporting.image_figures import FAST_PNG, image_panel, showcase_order
from patchlab.tuning.operating_point import OperatingPoint
from patchlab.tuning.rates import decision_rates

# The figures every run gets, in the order reports show them.
RUN_FIGURES = (
    "score_distributions.png",
    "operating_characteristic.png",
    "roc_curves.png",
    "pr_curve.png",
    "failure_cases.png",
)
CURVE_POINTS = 500  # points drawn per curve: pixel curves have millions of thresholds
CURVE_CHUNK = 1 << 18  # thresholds walked at a time when thinning a curve


@dataclass(frozen=True)
class Decision:
    """The image decision the figures mark: its threshold, the operating point it was chosen
    by (None: the test set's F1-max, untuned), and the images that judge it (the held-out
    part of a tuned run; None: all)."""

    threshold: float
    point: OperatingPoint | None = None
    judged: torch.Tensor | None = None

    @property
    def label(self) -> str:
        return self.point.label() if self.point else "test-set F1-max (untuned)"


def score_distributions(outputs: TestOutputs, samples: list[Sample], decision: Decision) -> Figure:
    """Image scores of good vs each defect type, with the operating point's threshold."""
    threshold = decision.threshold
    frame = pd.DataFrame(
        {"image score": outputs.image_scores.numpy(), "type": [s.defect_type for s in samples]}
    )
    order = ["good", *sorted(set(frame["type"]) - {"good"})]
    figure = Figure(figsize=(8, 0.6 * len(order) + 2), layout="constrained")
    axis = figure.subplots()
    sns.boxplot(frame, x="image score", y="type", order=order, ax=axis, color="0.85", fliersize=0)
    # A swarm, not a strip: strip jitter draws from numpy's global random state.
    sns.swarmplot(
        frame,
        x="image score",
        y="type",
        order=order,
        ax=axis,
        hue="type",
        hue_order=order,
        palette="tab10",
        size=5,
        legend=False,
    )
    axis.axvline(
        threshold,
        color="crimson",
        linestyle="--",
        label=f"threshold {threshold:.4g}: operating point {decision.label}",
    )
    figure.legend(loc="outside lower center")  # below the axes, never over a point
    axis.set_title("Image scores by defect type")
    return figure


def operating_characteristic(
    outputs: TestOutputs, samples: list[Sample], decision: Decision
) -> Figure:
    """Recall against false-reject rate over every image threshold (the curve a line engineer
    reads), the chosen point with its 95% intervals on both axes, and the objective's target."""
    index = decision.judged if decision.judged is not None else torch.arange(len(samples))
    scores, labels = outputs.image_scores[index], outputs.labels[index]
    types = [samples[i].defect_type for i in index.tolist()]
    part = "held-out" if decision.judged is not None else "test"
    figure = Figure(figsize=(6.5, 6), layout="constrained")
    axis = figure.subplots()
    if labels.min() == labels.max():
        return _note(figure, axis, "Operating characteristic", "needs good and defective images")
    false_reject, recall = _curve(rank(scores, labels), "roc")
    axis.plot(false_reject, recall, color="tab:blue", label=f"{part} images, every threshold")
    rates = decision_rates(scores, labels, types, decision.threshold)
    chosen = [rates[name] for name in ("false_reject_rate", "recall")]
    (x_low, x_high), (y_low, y_high) = (rate.interval() for rate in chosen)
    x, y = (rate.value for rate in chosen)
    axis.errorbar(
        [x],
        [y],
        xerr=[[x - x_low], [x_high - x]],
        yerr=[[y - y_low], [y_high - y]],
        fmt="o",
        color="crimson",
        capsize=4,
        label=f"{decision.label}: recall {y:.3f}, false rejects {x:.3f} (95% CI bars)",
    )
    point = decision.point
    if point is not None and point.objective == "false_reject":
        axis.axvline(point.target, color="0.4", linestyle=":", label=f"target <= {point.target:g}")
    if point is not None and point.objective == "recall":
        axis.axhline(point.target, color="0.4", linestyle=":", label=f"target >= {point.target:g}")
    axis.set(
        xlabel="false-reject rate (good images rejected)",
        ylabel="recall (defective images caught)",
        title=f"Operating characteristic, {len(labels)} {part} images",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.04),
    )
    figure.legend(loc="outside lower center")
    return figure


def _curve(counts: RankedCounts, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the exact ROC or PR curve, thinned to points about evenly spaced along it.

    Pixel curves have millions of thresholds; thinning by path length keeps their steep
    low-FPR part, where they do everything, as finely drawn as the rest. The path is walked
    in chunks: whole-curve float64 temporaries were 200-300 MB on bottle's 4M pixels, the
    run's peak memory.
    """
    x, y = (t.numpy() for t in (counts.roc() if kind == "roc" else counts.pr()))
    length = max(sum(float(steps.sum()) for _, steps in _steps(x, y)), 1e-12)
    keep, travelled, last = [], 0.0, -1
    for lo, steps in _steps(x, y):
        along = travelled + np.cumsum(steps)
        segment = (along / length * CURVE_POINTS).astype(np.int64)
        new = segment != np.concatenate([[last], segment[:-1]])
        keep.append(lo + np.flatnonzero(new))
        travelled, last = along[-1], segment[-1]
    chosen = np.union1d(np.concatenate(keep), [0, len(x) - 1])  # both ends, always
    return x[chosen], y[chosen]


def _steps(x: np.ndarray, y: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Per chunk of points from `lo`: the L1 step into each point (0 into the first)."""
    for lo, hi in chunks(len(x), CURVE_CHUNK):
        start = max(lo - 1, 0)
        steps = np.abs(np.diff(x[start:hi]).astype(np.float64))
        steps += np.abs(np.diff(y[start:hi]))
        yield lo, (np.concatenate([[0.0], steps]) if lo == 0 else steps)


def roc_curves(image: RankedCounts, pixel: RankedCounts | None) -> Figure:
    """Image and pixel ROC curves, AUROC in the legend; image only without masks."""
    figure = Figure(figsize=(6, 5.5), layout="constrained")
    axis = figure.subplots()
    curves = [("image", image)] + ([("pixel", pixel)] if pixel is not None else [])
    for name, counts in curves:
        fpr, tpr = _curve(counts, "roc")
        sns.lineplot(
            x=fpr,
            y=tpr,
            ax=axis,
            label=f"{name} AUROC {counts.auroc():.4f}",
            estimator=None,
            sort=False,
        )
    axis.plot([0, 1], [0, 1], color="0.6", linestyle=":")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    return figure


def pr_curve(image: RankedCounts, pixel: RankedCounts | None) -> Figure:
    """The pixel precision-recall curve with its F1-max point; in image-only mode (no masks)
    the image-level one, so the figure always shows a curve."""
    counts, level = (pixel, "Pixel") if pixel is not None else (image, "Image")
    figure = Figure(figsize=(6, 5.5), layout="constrained")
    axis = figure.subplots()
    if counts.positives == 0 or counts.negatives == 0:
        return _note(figure, axis, f"{level} precision-recall", "needs both classes")
    recall, precision = _curve(counts, "pr")
    best_f1, _ = counts.f1_max()
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    sns.lineplot(
        x=recall, y=precision, ax=axis, estimator=None, sort=False, label=f"{level.lower()}s"
    )
    axis.scatter(
        [recall[best]], [precision[best]], color="crimson", zorder=3, label=f"F1-max {best_f1:.4f}"
    )
    title = f"{level} precision-recall" + ("" if pixel is not None else " (no masks)")
    axis.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(loc="lower left")
    return figure


def _note(figure: Figure, axis, title: str, text: str) -> Figure:
    axis.set_axis_off()
    axis.set_title(title)
    axis.text(0.5, 0.5, text, ha="center", va="center")
    return figure


def failure_grid(outputs: TestOutputs, samples: list[Sample], display, count: int) -> Figure:
    """Top row: the most anomalous good images; bottom row: the least anomalous defects."""
    scores = outputs.image_scores
    goods = showcase_order(outputs, "goods")[:count]
    defects = showcase_order(outputs, "defects")[:count]
    figure = Figure(figsize=(2.2 * count, 5), layout="constrained")
    axes = figure.subplots(2, count, squeeze=False)
    for row, (indices, name) in enumerate(
        ((goods, "most anomalous goods"), (defects, "least anomalous defects"))
    ):
        for column, axis in enumerate(axes[row]):
            image_panel(axis)
            if column < len(indices):
                sample = samples[indices[column]]
                axis.imshow(display(read_image(sample.image)).permute(1, 2, 0).numpy())
                axis.set_title(
                    f"{sample.defect_type}\n{float(scores[indices[column]]):.3f}", fontsize=9
                )
        axes[row][0].text(
            -0.1,
            0.5,
            name,
            transform=axes[row][0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=10,
        )
    figure.suptitle("Failure cases")
    return figure


def write_run_figures(
    outputs: TestOutputs,
    samples: list[Sample],
    display,
    folder: Path,
    decision: Decision,
    grid_count: int,
    image: RankedCounts,
    pixel: RankedCounts | None,
) -> list[Path]:
    """Writes RUN_FIGURES as PNGs into `folder`, in that order.

    `image` and `pixel` rank the image scores and the maps (None for image-only data): the
    run's metrics sorted them already.
    """
    folder.mkdir(parents=True, exist_ok=True)
    drawers = {
        "score_distributions.png": lambda: score_distributions(outputs, samples, decision),
        "operating_characteristic.png": lambda: operating_characteristic(
            outputs, samples, decision
        ),
        "roc_curves.png": lambda: roc_curves(image, pixel),
        "pr_curve.png": lambda: pr_curve(image, pixel),
        "failure_cases.png": lambda: failure_grid(outputs, samples, display, grid_count),
    }
    paths = []
    for name in RUN_FIGURES:  # one figure alive at a time
        drawers[name]().savefig(folder / name, dpi=90, pil_kwargs=FAST_PNG)
        paths.append(folder / name)
    return paths
