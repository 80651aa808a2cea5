"""Config -> objects: the settings check, the data module, the Lightning-wrapped detector, the
trainer.

Constructors name the settings they reject; this layer adds where those live in the config
(`{num_neighbors}` -> `model.num_neighbors`) and raises everything the user can fix as one
UserError, with the original error as its cause.
"""

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from patchlab.core.coreset import Stop
from patchlab.core.detector import PatchCore
from patchlab.errors import SettingError, UserError
from patchlab.jobs.stage_marks import StageMarks
from patchlab.training.datamodule import AnomalyDataModule
from patchlab.training.lightning_module import PatchCoreModule
from patchlab.tuning.study import ThresholdTuning

T = TypeVar("T")
# Arguments this layer passes itself; a config file naming one would be overridden silently.
PASSED_BY_BUILD = {
    "model": {"backbone", "sampler", "search"},
    "data": {"holdout"},
    "trainer": {"callbacks"},
}
SETTING_GROUPS = ("model", "search", "sampler", "data.geometry", "data", "backbone")
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # the project's, for hints only


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


def _target_nodes(node: object, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every config node with a `_target_`, with its dotted path."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def options_with(group: str, key: str) -> list[str]:
    """The `conf/<group>/` files that set `key`: where a misplaced setting belongs."""
    folder = CONF_DIR / group
    if not folder.is_dir():
        return []
    return sorted(
        f"{group}={path.stem}"
        for path in folder.glob("*.yaml")
        if any(line.startswith(f"{key}:") for line in path.read_text().splitlines())
    )


def check_settings(cfg: DictConfig) -> None:
    """Every setting under a `_target_` must be an argument of that target.

    Hydra would otherwise build the class and a stray key would fail deep inside it, or, for
    keys this layer never passes on, be logged to MLflow as if it had mattered.
    """
    for path, node in _target_nodes(cfg, ""):
        target = configured(path, lambda node=node: get_object(node._target_))
        parameters = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        passed = PASSED_BY_BUILD.get(path, set())
        for key in node:
            if str(key).startswith("_"):
                continue
            if key not in parameters or key in passed:
                takes = sorted(set(parameters) - passed) or ["no settings"]
                elsewhere = options_with(path, str(key))
                hint = f"; it is a setting of {', '.join(elsewhere)}" if elsewhere else ""
                raise UserError(
                    f"{path}.{key} is not a setting of {node._target_} (it takes: "
                    f"{', '.join(takes)}){hint}"
                )


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
) -> tuple[AnomalyDataModule, PatchCoreModule, pl.Trainer, ThresholdTuning | None]:
    """Instantiates data first, so a bad folder fails before any weights are loaded."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tuning = build_tuning(cfg)
    holdout = tuning.holdout_images if tuning else 0
    datamodule = configured("data", lambda: instantiate(cfg.data, holdout=holdout), cfg)
    configured("data", datamodule.prepare_data)
    configured("data", datamodule.setup)
    detector = build_detector(cfg)
    train_images = len(datamodule.train_samples)
    check = lambda: detector.check_bank_size(train_images, datamodule.input_size)  # noqa: E731
    configured("model", check, cfg)
    trainer = configured("trainer", lambda: instantiate(cfg.trainer, callbacks=[StageMarks()]))
    return datamodule, PatchCoreModule(detector, stop), trainer, tuning
