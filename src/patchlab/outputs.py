"""The files a run leaves in its output dir, and the test pass they record.

Framework-free on purpose: rendering, re-tuning and reporting read these files without
importing Lightning, and nothing here runs code on load (safetensors, CSV, JSON, YAML).
"""

import csv
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from patchlab.data.mvtec import Sample

BANK_FILE = "memory_bank.safetensors"
OUTPUTS_FILE = "test_outputs.safetensors"
SCORES_FILE = "scores.csv"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TUNING_FILE = "tuning.json"


@dataclass
class TestOutputs:
    """Everything the test pass produced, in dataset order, for metrics, figures and tuning."""

    image_scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    maps: torch.Tensor  # (N, H, W) anomaly maps at crop resolution
    masks: torch.Tensor  # (N, H, W) uint8 ground truth; zeros where not `mask_known`
    patch_scores: torch.Tensor  # (N, h, w) before upsampling and blur: what tuning re-blurs
    # (N,) bool: pixels labelled (goods always, defects when a mask exists). Defaults to all
    # True, as test outputs saved before image-only data existed had masks for every image.
    mask_known: torch.Tensor | None = None

    __test__ = False  # a data class, not a pytest test class

    def __post_init__(self) -> None:
        if self.mask_known is None:
            self.mask_known = torch.ones(len(self.labels), dtype=torch.bool)

    @property
    def pixel_labelled(self) -> bool:
        """Whether pixel metrics can be computed: False in image-only mode."""
        return bool(self.mask_known.all())

    def subset(self, index: torch.Tensor) -> "TestOutputs":
        """The images at `index`, e.g. a validation split."""
        return TestOutputs(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def save_outputs(outputs: TestOutputs, path: Path) -> None:
    """Caches the test pass so thresholds can be re-tuned and figures redrawn without the model."""
    tensors = {f.name: getattr(outputs, f.name).contiguous() for f in fields(outputs)}
    save_file(tensors, str(path))


def load_outputs(path: Path) -> TestOutputs:
    """The cached test pass; files from before `mask_known` existed load as fully masked."""
    return TestOutputs(**load_file(str(path)))


def read_samples(path: Path) -> list[Sample]:
    """The test samples back from scores.csv, in dataset order."""
    with path.open() as file:
        return [Sample(Path(row["path"]), row["defect_type"]) for row in csv.DictReader(file)]


def write_scores_csv(outputs: TestOutputs, samples: list[Sample], path: Path) -> None:
    """One row per test image: where it is (absolute, so the file works from any folder), what
    it is, and how anomalous the model found it."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for sample, score in zip(samples, outputs.image_scores, strict=True):
            writer.writerow(
                [str(sample.image.resolve()), sample.defect_type, sample.label, float(score)]
            )


def save_bank(bank: torch.Tensor, cfg: DictConfig, path: Path, extra: dict | None = None) -> None:
    """Writes the (M, D) bank plus the resolved config, so loading needs nothing but this file.

    `extra` holds JSON-able results that travel with the bank (e.g. tuned thresholds).
    """
    data = OmegaConf.to_container(cfg.data, resolve=True)
    metadata = {
        "backbone": cfg.backbone.name,
        "layers": json.dumps(list(cfg.backbone.layers)),
        "feature_dim": str(bank.shape[1]),
        "bank_size": str(bank.shape[0]),
        "projection_dim": str(cfg.model.projection_dim),
        "seed": str(cfg.seed),
        "preprocessing": json.dumps({k: data[k] for k in ("resize", "crop_size", "mean", "std")}),
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "extra": json.dumps(extra or {}),
    }
    save_file({"memory_bank": bank.contiguous()}, str(path), metadata=metadata)


def read_bank(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Returns the (M, D) bank and its metadata strings."""
    with safe_open(str(path), framework="pt") as file:
        return file.get_tensor("memory_bank"), file.metadata()
