"""The memory bank as safetensors, with the metadata to score new images; nothing runs on load."""

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from patchlab.lightning_module import PatchCore


def save_bank(model: PatchCore, cfg: DictConfig, path: Path, extra: dict | None = None) -> None:
    """Writes the bank plus the resolved config, so loading needs nothing but this file.

    `extra` holds JSON-able results that travel with the bank (e.g. tuned thresholds).
    """
    data = OmegaConf.to_container(cfg.data, resolve=True)
    metadata = {
        "backbone": cfg.backbone.name,
        "layers": json.dumps(list(cfg.backbone.layers)),
        "feature_dim": str(model.memory_bank.shape[1]),
        "bank_size": str(model.memory_bank.shape[0]),
        "projection_dim": str(cfg.model.projection_dim),
        "seed": str(cfg.seed),
        "preprocessing": json.dumps({k: data[k] for k in ("resize", "crop_size", "mean", "std")}),
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "extra": json.dumps(extra or {}),
    }
    save_file({"memory_bank": model.memory_bank.contiguous()}, str(path), metadata=metadata)


def read_bank(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Returns the (M, D) bank and its metadata strings."""
    with safe_open(str(path), framework="pt") as file:
        return file.get_tensor("memory_bank"), file.metadata()


def load_model(path: Path, weights: str | None = None) -> tuple[PatchCore, DictConfig]:
    """Rebuilds the fitted model from a bank file; `weights` overrides the backbone's source."""
    bank, metadata = read_bank(path)
    cfg = OmegaConf.create(metadata["config"])
    if weights is not None:
        cfg.backbone.weights = weights
    torch.manual_seed(cfg.seed)  # as in training, so even a random-init backbone comes back equal
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone))
    model.load_bank(bank)
    return model, cfg
