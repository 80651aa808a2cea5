"""Files a run leaves in its output dir, by name: bank, cached test outputs, per-image scores."""

import csv
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patchlab.data.datamodule import AnomalyDataModule
from patchlab.data.mvtec import Sample
from patchlab.lightning_module import TestOutputs

BANK_FILE = "memory_bank.safetensors"
OUTPUTS_FILE = "test_outputs.safetensors"


def read_samples(path: Path) -> list[Sample]:
    """The test samples back from scores.csv, in dataset order."""
    with path.open() as file:
        return [Sample(Path(row["path"]), row["defect_type"]) for row in csv.DictReader(file)]


def write_scores_csv(outputs: TestOutputs, datamodule: AnomalyDataModule, path: Path) -> None:
    """One row per test image: where it is (absolute, so the file works from any folder), what
    it is, and how anomalous the model found it."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for sample, score in zip(datamodule.test_samples, outputs.image_scores, strict=True):
            writer.writerow(
                [str(sample.image.resolve()), sample.defect_type, sample.label, float(score)]
            )


def showcase_order(outputs: TestOutputs, selection: str = "failures") -> list[int]:
    """Which test images to draw, in order.

    `failures`: lowest-scored defects and highest-scored goods, alternating; `defects` or
    `goods`: only those, hardest first; `all`: every image, most anomalous first.
    """
    scores, labels = outputs.image_scores, outputs.labels
    defects = [int(i) for i in torch.argsort(scores) if labels[i] == 1]
    goods = [int(i) for i in torch.argsort(scores, descending=True) if labels[i] == 0]
    if selection == "defects":
        return defects
    if selection == "goods":
        return goods
    if selection == "all":
        return torch.argsort(scores, descending=True).tolist()
    if selection != "failures":
        raise ValueError(
            f"figures.selection must be failures, defects, goods or all; got {selection!r}"
        )
    order = []
    for pair in zip(defects, goods, strict=False):
        order += pair
    longer = defects if len(defects) > len(goods) else goods
    return order + longer[min(len(defects), len(goods)) :]


def save_outputs(outputs: TestOutputs, path: Path) -> None:
    """Caches the test pass so thresholds can be re-tuned and figures redrawn without the model."""
    tensors = {
        name: getattr(outputs, name).contiguous() for name in TestOutputs.__dataclass_fields__
    }
    save_file(tensors, str(path))


def load_outputs(path: Path) -> TestOutputs:
    """The cached test pass; files from before `mask_known` existed load as fully masked."""
    return TestOutputs(**load_file(str(path)))
