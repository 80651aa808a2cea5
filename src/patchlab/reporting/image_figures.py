"""Per-image figures: input, anomaly map and overlay, drawn headless (no pyplot state)."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from patchlab.core.outputs import TestOutputs
from patchlab.data.mvtec import Sample, read_image
from patchlab.tuning.postprocess import value_range

SELECTIONS = ("failures", "defects", "goods", "all")
# Pixels that were not scored (padding, ignored regions) are NaN in the maps: drawn grey.
HEAT = colormaps["inferno"].with_extremes(bad="0.55")
# zlib's fastest level: a run's figures encode in 40% less time, for files 20% larger.
FAST_PNG = {"compress_level": 1}


def showcase_order(outputs: TestOutputs, selection: str = "failures") -> list[int]:
    """Which test images to draw, in order.

    `failures`: lowest-scored defects and highest-scored goods, alternating; `defects` or
    `goods`: only those, hardest first; `all`: every image, most anomalous first.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"figures.selection must be one of {list(SELECTIONS)}; got {selection!r}")
    scores, labels = outputs.image_scores, outputs.labels
    defects = [int(i) for i in torch.argsort(scores) if labels[i] == 1]
    goods = [int(i) for i in torch.argsort(scores, descending=True) if labels[i] == 0]
    if selection == "defects":
        return defects
    if selection == "goods":
        return goods
    if selection == "all":
        return torch.argsort(scores, descending=True).tolist()
    order = []
    for pair in zip(defects, goods, strict=False):
        order += pair
    longer = defects if len(defects) > len(goods) else goods
    return order + longer[min(len(defects), len(goods)) :]


def image_panel(axis: Axes) -> None:
    """An axis that shows an image: no frame and no ticks. Hidden ticks still cost: matplotlib
    built and measured them to place each panel's title, a third of a heatmap's drawing."""
    axis.set_axis_off()
    axis.set_xticks([])
    axis.set_yticks([])


def heatmap_figure(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    title: str,
    scale: tuple[float, float],
    predicted: np.ndarray | None = None,
) -> Figure:
    """input | anomaly map with colour bar | overlay with ground-truth (and predicted) contours.

    `mask` None means the image has no ground truth (image-only data), not an empty one.
    """
    # A fixed layout: the constrained one re-measures every text box and took half the time.
    figure = Figure(figsize=(11, 3.8))
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.06)
    axes = figure.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("input")
    shown = axes[1].imshow(anomaly_map, cmap=HEAT, vmin=scale[0], vmax=scale[1])
    unscored = bool(np.isnan(anomaly_map).any())
    axes[1].set_title("anomaly map" + ("   not scored: grey" if unscored else ""))
    figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
    axes[2].imshow(image)
    axes[2].imshow(anomaly_map, cmap=HEAT, vmin=scale[0], vmax=scale[1], alpha=0.5)
    if mask is not None and mask.any():
        axes[2].contour(mask, levels=[0.5], colors="lime", linewidths=1.5)
    if predicted is not None and predicted.any():
        axes[2].contour(predicted, levels=[0.5], colors="cyan", linewidths=1.2, linestyles="--")
    truth = "truth: green" if mask is not None else "no ground truth"
    axes[2].set_title(truth + ("   predicted: cyan" if predicted is not None else ""))
    for axis in axes:
        image_panel(axis)
    figure.suptitle(title, fontsize=11)
    return figure


def write_heatmaps(
    outputs: TestOutputs,
    samples: list[Sample],
    display: Callable[[torch.Tensor], torch.Tensor],
    folder: Path,
    count: int | None,
    selection: str = "failures",
    image_threshold: float | None = None,
    predicted_masks: torch.Tensor | None = None,
) -> list[Path]:
    """Writes `count` figures (all when None) in `selection` order, on one colour scale.

    With an `image_threshold` titles carry the decision; with `predicted_masks` overlays do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scale = value_range(outputs.maps)
    paths = []
    for rank, index in enumerate(showcase_order(outputs, selection)[:count]):
        sample = samples[index]
        image = display(read_image(sample.image)).permute(1, 2, 0).numpy()
        score = float(outputs.image_scores[index])
        label = int(outputs.labels[index])
        title = f"{sample.defect_type}/{sample.image.name}  label={label}  score={score:.3f}"
        if image_threshold is not None:
            title += f"  -> {'DEFECT' if score >= image_threshold else 'good'}"
        predicted = None if predicted_masks is None else predicted_masks[index].numpy()
        mask = outputs.masks[index].numpy() if outputs.mask_known[index] else None
        figure = heatmap_figure(image, outputs.maps[index].numpy(), mask, title, scale, predicted)
        path = folder / f"{rank:03d}_{sample.defect_type}_{sample.image.stem}.png"
        figure.savefig(path, dpi=80, pil_kwargs=FAST_PNG)
        paths.append(path)
    return paths
