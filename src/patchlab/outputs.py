"""The files a run leaves in its output dir, and the test pass they record.

Framework-free on purpose: rendering, re-tuning and reporting read these files without
importing Lightning, and nothing here runs code on load (safetensors, CSV, JSON, YAML).
"""

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from patchlab.data.mvtec import Sample
from patchlab.errors import UserError

BANK_FILE = "memory_bank.safetensors"
# The bank between fit and the end of the run: kept if the run fails or is killed, under a
# name that no loader (and no user) takes for a finished model.
UNFINISHED_BANK_FILE = "memory_bank.unfinished.safetensors"
OUTPUTS_FILE = "test_outputs.safetensors"
SCORES_FILE = "scores.csv"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TUNING_FILE = "tuning.json"

# The only classes a bank's config may name. A bank fetched from a shared tracking server is
# untrusted: its config is read as data, and a `_target_` outside this list is refused before
# anything is built. Old names are those of banks written before the package was grouped.
MOVED_TARGETS = {
    "patchlab.lightning_module.PatchCore": "patchlab.training.lightning_module.PatchCore",
    "patchlab.backbones.create_feature_extractor": (
        "patchlab.training.backbones.create_feature_extractor"
    ),
}
ALLOWED_TARGETS = frozenset(
    [*MOVED_TARGETS.values(), "patchlab.training.backbones.create_ensemble"]
)


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside `path`, renamed to `path` only when the block completes.

    A process killed while writing (SLURM's SIGTERM, then SIGKILL) leaves a hidden
    `.<name>.partial`, never a truncated file under the name readers look for.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(data: dict, path: Path) -> None:
    with written_atomically(path) as partial:
        partial.write_text(json.dumps(data, indent=2))


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
    with written_atomically(path) as partial:
        save_file(tensors, str(partial))


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
    with written_atomically(path) as partial, partial.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for sample, score in zip(samples, outputs.image_scores, strict=True):
            writer.writerow(
                [str(sample.image.resolve()), sample.defect_type, sample.label, float(score)]
            )


def save_bank(
    banks: list[torch.Tensor],
    cfg: DictConfig,
    path: Path,
    extra: dict | None = None,
    statistics: list[tuple[float, float]] | None = None,
) -> None:
    """Writes the (M, D) bank plus the resolved config, so loading needs nothing but this file.

    An ensemble's further members' banks go in as `memory_bank.1`, `memory_bank.2`, ..., and
    each member's normal statistics (mean, std) in the `statistics` metadata. `extra` holds
    JSON-able results that travel with the bank (e.g. tuned thresholds).
    """
    bank = banks[0]
    data = OmegaConf.to_container(cfg.data, resolve=True)
    layers = cfg.backbone.get("layers")
    metadata = {
        "backbone": cfg.backbone.name,
        "layers": json.dumps(list(layers) if layers is not None else None),
        "feature_dim": str(bank.shape[1]),
        "bank_size": str(bank.shape[0]),
        "projection_dim": str(cfg.model.projection_dim),
        "seed": str(cfg.seed),
        "preprocessing": json.dumps({k: data[k] for k in ("resize", "crop_size", "mean", "std")}),
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "extra": json.dumps(extra or {}),
    }
    if statistics:
        metadata["statistics"] = json.dumps(statistics)
    tensors = {bank_key(i): b.detach().cpu().contiguous() for i, b in enumerate(banks)}
    with written_atomically(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)


def bank_digest(banks: list[torch.Tensor]) -> str:
    """sha256 of the banks' float32 values alone (not the file, whose metadata holds the
    config): equal digests mean bit-identical banks."""
    digest = hashlib.sha256()
    for bank in banks:
        digest.update(bank.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def bank_key(member: int) -> str:
    """The tensor name of member `member`'s bank: `memory_bank` for a single backbone."""
    return "memory_bank" if member == 0 else f"memory_bank.{member}"


def read_bank(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Returns the (first member's) (M, D) bank and its metadata strings."""
    with safe_open(str(path), framework="pt") as file:
        return file.get_tensor("memory_bank"), file.metadata()


def read_banks(path: Path) -> tuple[list[torch.Tensor], list[tuple[float, float]], dict[str, str]]:
    """Every member's bank, the members' normal statistics (empty for one backbone), metadata."""
    with safe_open(str(path), framework="pt") as file:
        count = len(list(file.keys()))
        banks = [file.get_tensor(bank_key(i)) for i in range(count)]
        metadata = file.metadata()
    statistics = [tuple(s) for s in json.loads(metadata.get("statistics", "[]"))]
    return banks, statistics, metadata


def _targets(node: object, path: str) -> list[tuple[str, object]]:
    """Every `_target_` under `node`, with its dotted path."""
    if isinstance(node, dict):
        found = [(path, node["_target_"])] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{path}.{key}" if path else str(key))
        return found
    if isinstance(node, list):
        return [hit for i, value in enumerate(node) for hit in _targets(value, f"{path}[{i}]")]
    return []


def bank_config(path: Path, metadata: dict[str, str]) -> DictConfig:
    """The run's config from a bank's metadata, checked before anything is built from it.

    The YAML is parsed as data (no tags, no code). Old class names are mapped to their new
    homes; any other `_target_` in the model or backbone is refused with the key that holds it.
    """
    if "config" not in metadata:
        raise UserError(f"{path} has no 'config' metadata: not a patchlab memory bank")
    try:
        cfg = OmegaConf.create(metadata["config"])
    except Exception as error:
        raise UserError(f"{path}: its 'config' metadata is not valid YAML: {error}") from error
    for group in ("model", "backbone"):
        node = cfg.get(group)
        if node is None:
            raise UserError(f"{path}: its config has no '{group}' section")
        if "_target_" in node:
            node._target_ = MOVED_TARGETS.get(node._target_, node._target_)
        for where, target in _targets(OmegaConf.to_container(node), group):
            if target not in ALLOWED_TARGETS:
                raise UserError(
                    f"{path}: refused to load: {where}._target_ is {target!r}, and only "
                    f"{sorted(ALLOWED_TARGETS)} may be built from a bank file"
                )
    return cfg


def check_bank(path: Path, bank: torch.Tensor, metadata: dict[str, str], feature_dim: int) -> None:
    """A bank must be the shape its metadata says and the width its backbone produces."""
    if bank.ndim != 2:
        raise UserError(f"{path}: memory_bank has shape {tuple(bank.shape)}, expected (M, D)")
    for key, actual in (("bank_size", bank.shape[0]), ("feature_dim", bank.shape[1])):
        if key in metadata and metadata[key] != str(actual):
            raise UserError(
                f"{path}: memory_bank has {key} {actual}, metadata says {metadata[key]}"
            )
    if bank.shape[1] != feature_dim:
        raise UserError(
            f"{path}: memory_bank has {bank.shape[1]} features per patch, but backbone "
            f"{metadata.get('backbone')} with layers {metadata.get('layers')} makes {feature_dim}: "
            "the bank was built with another backbone, layers or embedding_dim"
        )
