"""The config layer: Hydra config -> data module, model and trainer, or a fitted model from a bank.

Constructors name the settings they reject; this layer adds where those live in the config
(`{num_neighbors}` -> `model.num_neighbors`) and raises everything the user can fix as one
UserError, with the original error as its cause.
"""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from patchlab.data.datamodule import AnomalyDataModule
from patchlab.errors import SettingError, UserError
from patchlab.outputs import bank_config, check_bank, read_banks
from patchlab.training.lightning_module import PatchCore
from patchlab.training.stage_marks import StageMarks
from patchlab.tuning.study import ThresholdTuning

T = TypeVar("T")


def underlying_error(error: Exception) -> Exception:
    """Hydra wraps a constructor's error in InstantiationException; the cause says what is wrong."""
    while isinstance(error, InstantiationException) and isinstance(error.__cause__, Exception):
        error = error.__cause__
    return error


def user_message(error: Exception, group: str) -> str:
    """The constructor's own message, its settings named by their place under `group`."""
    error = underlying_error(error)
    if isinstance(error, SettingError):
        return error.named(lambda setting: f"{group}.{setting}")
    return str(error) or type(error).__name__


def configured(group: str, make: Callable[[], T]) -> T:
    """Runs `make`; whatever it raises is the user's to fix in config group `group`."""
    try:
        return make()
    except Exception as error:
        raise UserError(user_message(error, group)) from error


def build_tuning(cfg: DictConfig) -> ThresholdTuning | None:
    """`threshold=optuna` -> the tuning object; `threshold=none` -> None."""
    if cfg.get("threshold") is None:
        metric = str(cfg.get("optimized_metric", ""))
        if metric.startswith(("val_", "held_out_")):
            raise UserError(
                f"optimized_metric={metric} is measured on the validation split of "
                "threshold=optuna; add threshold=optuna or pick a test metric (image_auroc, ...)"
            )
        return None
    return configured("threshold", lambda: instantiate(cfg.threshold))


def build_model(cfg: DictConfig) -> PatchCore:
    backbone = configured("backbone", lambda: instantiate(cfg.backbone))
    return configured("model", lambda: instantiate(cfg.model, backbone=backbone))


def build(
    cfg: DictConfig,
) -> tuple[AnomalyDataModule, PatchCore, pl.Trainer, ThresholdTuning | None]:
    """Instantiates data first, so a bad folder fails before any weights are loaded."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tuning = build_tuning(cfg)
    holdout = tuning.holdout_images if tuning else 0
    datamodule = configured("data", lambda: instantiate(cfg.data, holdout=holdout))
    configured("data", datamodule.prepare_data)
    configured("data", datamodule.setup)
    model = build_model(cfg)
    train_images = len(datamodule.train_samples)
    configured("model", lambda: model.check_bank_size(train_images, datamodule.crop_size))
    trainer = configured("trainer", lambda: instantiate(cfg.trainer, callbacks=[StageMarks()]))
    return datamodule, model, trainer, tuning


def load_model(path: Path, weights: str | None = None) -> tuple[PatchCore, DictConfig]:
    """Rebuilds the fitted model from a bank file; `weights` overrides the backbone's source.

    Only allow-listed classes are built (see `outputs.bank_config`), and a bank that does not
    fit its backbone is refused.
    """
    banks, statistics, metadata = read_banks(path)
    cfg = bank_config(path, metadata)
    if weights is not None:
        if "members" in cfg.backbone:
            raise UserError(f"{path} holds an ensemble: give each member's weights in its config")
        cfg.backbone.weights = weights
    torch.manual_seed(cfg.seed)  # as in training, so even a random-init backbone comes back equal
    model = build_model(cfg)
    if len(banks) != len(model.feature_dims):
        raise UserError(
            f"{path}: {len(banks)} banks, but its backbone has {len(model.feature_dims)}"
        )
    for bank, feature_dim in zip(banks, model.feature_dims, strict=True):
        check_bank(path, bank, metadata if bank is banks[0] else {}, feature_dim)
    model.load_banks(banks, statistics)
    return model, cfg
