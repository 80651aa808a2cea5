"""One category, end to end: check data, build the bank, test, write metrics.json."""

import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from patchlab.data.datamodule import MVTecDataModule
from patchlab.lightning_module import PatchCore
from patchlab.metrics import evaluate

log = logging.getLogger(__name__)


def check_bank_size(model: PatchCore, datamodule: MVTecDataModule) -> None:
    """Fails before feature extraction when k-NN reweighting would need more bank than exists."""
    grid = datamodule.crop_size // model.backbone.strides[0]
    patches = len(datamodule.train_samples) * grid * grid
    bank = max(1, int(patches * model.sampler.ratio))
    if model.scorer.num_neighbors > bank:
        raise ValueError(
            f"model.num_neighbors={model.scorer.num_neighbors} is larger than the memory bank "
            f"this run would build ({bank} patches from {patches}); lower model.num_neighbors "
            "or raise model.coreset_ratio"
        )


def build(cfg: DictConfig) -> tuple[MVTecDataModule, PatchCore, pl.Trainer]:
    """Instantiates data first, so a bad folder fails before any weights are loaded."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone))
    check_bank_size(model, datamodule)
    return datamodule, model, instantiate(cfg.trainer)


def run(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, float], PatchCore]:
    """Fits and tests one category; returns its metrics and the fitted model."""
    datamodule, model, trainer = build(cfg)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start - fit_seconds
    out = model.outputs
    metrics = evaluate(out.image_scores, out.labels, out.maps, out.masks)
    metrics |= {
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "bank_size": float(model.memory_bank.shape[0]),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(
        "%s: image_auroc=%.4f pixel_auroc=%.4f pixel_f1_max=%.4f aupro=%.4f bank=%d "
        "fit=%.0fs test=%.0fs",
        cfg.category.name,
        metrics["image_auroc"],
        metrics["pixel_auroc"],
        metrics["pixel_f1_max"],
        metrics["aupro"],
        metrics["bank_size"],
        fit_seconds,
        test_seconds,
    )
    return metrics, model
