"""Config -> objects: the settings check, the data module, the Lightning-wrapped detector, the
trainer.

Constructors name the settings they reject; this layer adds where those live in the config
(`{num_neighbors}` -> `model.num_neighbors`) and raises everything the user can fix as one
UserError, with the original error as its cause.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from patchlab.core.detector import PatchCore
from patchlab.core.stoppable import Stop
from patchlab.errors import SettingError, UserError
from patchlab.jobs.stage_marks import StageMarks
from patchlab.training.datamodule import AnomalyDataModule
from patchlab.training.lightning_module import PatchCoreModule

if TYPE_CHECKING:  # built from the config by Hydra: optuna is imported only when tuning
    from patchlab.tuning.study import ThresholdTuning

T = TypeVar("T")
SETTING_GROUPS = ("model", "search", "sampler", "data.geometry", "data", "backbone")


def underlying_error(error: Exception) -> Exception:
    """Hydra wraps a constructor's error in InstantiationException; the cause says what is wrong."""
    while isinstance(error, InstantiationException) and isinstance(error.__cause__, Exception):
        error = error.__cause__
    return error


def user_message(error: Exception, group: str, cfg: DictConfig | None = None) -> str:
    """The constructor's own message, its settings named by their place in the config: under
    `group`, or under the group of `cfg` that holds the setting (`search.ivf_lists`)."""
    error = underlying_error(error)
    if not isinstance(error, SettingError):
        return str(error) or type(error).__name__

    def where(setting: str) -> str:
        nodes = (group, *SETTING_GROUPS) if cfg is not None else ()
        holders = [g for g in nodes if setting in (OmegaConf.select(cfg, g) or {})]
        return f"{holders[0] if holders else group}.{setting}"

    return error.named(where)


def configured(group: str, make: Callable[[], T], cfg: DictConfig | None = None) -> T:
    """Runs `make`; whatever it raises is the user's to fix in config group `group` (or, given
    `cfg`, in the group that holds the setting the message names)."""
    try:
        return make()
    except Exception as error:
        raise UserError(user_message(error, group, cfg)) from error


def build_tuning(cfg: DictConfig) -> "ThresholdTuning | None":
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


def check_selection_metric(
    cfg: DictConfig, datamodule: AnomalyDataModule, tuning: "ThresholdTuning | None"
) -> None:
    """A pixel `optimized_metric` on data without masks is refused before any work: the run
    would train, test and tune, then have no value to return to a sweeper. Synthetic
    validation has masks of its own, so its `val_` pixel metrics exist."""
    metric = str(cfg.get("optimized_metric", ""))
    synthetic = tuning is not None and tuning.validation == "synthetic"
    if datamodule.pixel_labelled or not ("pixel" in metric or "aupro" in metric):
        return
    if synthetic and metric.startswith("val_"):
        return
    image = "val_image_auroc" if metric.startswith("val_") else "image_auroc"
    raise UserError(
        f"optimized_metric={metric} needs pixel masks, and {datamodule.name} has none "
        f"({datamodule.no_masks_reason}); select by an image metric: optimized_metric={image}"
    )


def build_detector(cfg: DictConfig) -> PatchCore:
    """The detector the config describes, its backbone seeded as loading seeds it."""
    torch.manual_seed(cfg.seed)  # so even a random-init backbone comes back equal when loaded
    backbone = configured("backbone", lambda: instantiate(cfg.backbone))
    sampler = configured("sampler", lambda: instantiate(cfg.sampler))
    configured("search", lambda: instantiate(cfg.search))  # its settings, checked once
    search = instantiate(cfg.search, _partial_=True)
    return configured(
        "model", lambda: instantiate(cfg.model, backbone=backbone, sampler=sampler, search=search)
    )


def build(
    cfg: DictConfig, stop: Stop | None = None
) -> tuple[AnomalyDataModule, PatchCoreModule, pl.Trainer, "ThresholdTuning | None"]:
    """Instantiates data first, so a bad folder fails before any weights are loaded."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tuning = build_tuning(cfg)
    holdout = tuning.holdout_images if tuning else 0
    datamodule = configured("data", lambda: instantiate(cfg.data, holdout=holdout), cfg)
    configured("data", datamodule.prepare_data)
    configured("data", datamodule.setup)
    check_selection_metric(cfg, datamodule, tuning)
    detector = build_detector(cfg)
    train_images = len(datamodule.train_samples)
    check = lambda: detector.check_bank_size(train_images, datamodule.input_size)  # noqa: E731
    configured("model", check, cfg)
    trainer = configured("trainer", lambda: instantiate(cfg.trainer, callbacks=[StageMarks()]))
    return datamodule, PatchCoreModule(detector, stop), trainer, tuning
