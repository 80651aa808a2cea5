"""One category, end to end: check data, build the bank, test, write and log the results."""

import ctypes
import ctypes.util
import json
import logging
import resource
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from patchlab.artifacts import BANK_FILE, OUTPUTS_FILE, save_outputs, write_scores_csv
from patchlab.bank_io import save_bank
from patchlab.data.datamodule import AnomalyDataModule
from patchlab.errors import UserError
from patchlab.lightning_module import PatchCore
from patchlab.metrics import evaluate
from patchlab.render import render_run
from patchlab.tracking import log_datasets, log_metrics
from patchlab.tuning.study import tune_and_log
from patchlab.tuning.synthetic import synthetic_validation

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def check_bank_size(model: PatchCore, datamodule: AnomalyDataModule) -> None:
    """Fails before feature extraction when the search would need more bank than exists."""
    grid = datamodule.crop_size // model.backbone.strides[0]
    patches = len(datamodule.train_samples) * grid * grid
    bank = max(1, int(patches * model.sampler.ratio))
    scorer = model.scorer
    needs = [("num_neighbors", scorer.num_neighbors)]
    if scorer.search == "ivf" and scorer.ivf_lists is not None:
        needs.append(("ivf_lists", scorer.ivf_lists))
    for name, value in needs:
        if value > bank:
            raise ValueError(
                f"model.{name}={value} is larger than the memory bank this run would build "
                f"({bank} patches from {patches}); lower model.{name} or raise "
                "model.coreset_ratio"
            )


def build(cfg: DictConfig) -> tuple[AnomalyDataModule, PatchCore, pl.Trainer]:
    """Instantiates data first, so a bad folder fails before any weights are loaded.

    Whatever fails here is the data, the config or the weights, all the user's to fix, so it
    is raised as a UserError with the underlying message; the original stays its `__cause__`.
    """
    try:
        return _build(cfg)
    except Exception as error:
        raise UserError(underlying_message(error)) from error


def underlying_message(error: Exception) -> str:
    """Hydra wraps a constructor's error in InstantiationException; the cause says what is wrong."""
    while isinstance(error, InstantiationException) and isinstance(error.__cause__, Exception):
        error = error.__cause__
    return str(error) or type(error).__name__


def _build(cfg: DictConfig) -> tuple[AnomalyDataModule, PatchCore, pl.Trainer]:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, holdout=synthetic_count(cfg))
    datamodule.prepare_data()
    datamodule.setup()
    model = instantiate(cfg.model, backbone=instantiate(cfg.backbone))
    check_bank_size(model, datamodule)
    return datamodule, model, instantiate(cfg.trainer)


def synthetic_count(cfg: DictConfig) -> int:
    """Good images to hold back from the bank when tuning on synthetic anomalies."""
    tuning = cfg.threshold
    return int(tuning.synthetic_images) if tuning.get("validation") == "synthetic" else 0


def release_freed_memory() -> None:
    """Makes glibc hand every freed buffer of 1 MiB or more back to the OS.

    By default glibc raises its mmap threshold after each free, up to 32 MiB, so the 16 MB
    per-pixel buffers of metrics and figures come from the heap, whose freed holes stay
    resident: on bottle that added about 250 MB of peak RSS. A fixed threshold stops the
    creep at no measurable cost in speed. Elsewhere (macOS, musl) this does nothing.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_line(metrics: dict[str, float]) -> str:
    """The run's headline numbers; metrics a run did not compute are left out."""
    names = ("image_auroc", "pixel_auroc", "pixel_f1_max", "aupro")
    parts = [f"{name}={metrics[name]:.4f}" for name in names if name in metrics]
    tuned = ("pixel_f1", "image_f1")  # threshold=optuna: tuned on validation, held-out figures
    parts += [f"{name}(tuned, held-out)={metrics[name]:.4f}" for name in tuned if name in metrics]
    parts += [
        f"bank={metrics['bank_size']:.0f}",
        f"fit={metrics['fit_seconds']:.0f}s",
        f"test={metrics['test_seconds']:.0f}s",
    ]
    return " ".join(parts)


def run(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, float], PatchCore, AnomalyDataModule]:
    """Fits and tests one category; the bank is saved before testing so a failure keeps it."""
    release_freed_memory()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    datamodule, model, trainer = build(cfg)
    splits = {"train": datamodule.train_samples, "test": datamodule.test_samples}
    log_datasets(cfg.category.name, splits)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    log_metrics({"fit_seconds": fit_seconds, "bank_size": model.memory_bank.shape[0]})
    save_bank(model, cfg, output_dir / BANK_FILE)
    start = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    out = model.outputs
    save_outputs(out, output_dir / OUTPUTS_FILE)
    masks = out.masks if out.pixel_labelled else None  # image-only: pixel metrics left out
    metrics = evaluate(out.image_scores, out.labels, out.maps, masks) | {
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "bank_size": float(model.memory_bank.shape[0]),
        "peak_rss_mb": peak_rss_mb(),
    }
    log_metrics(metrics)
    if cfg.threshold.enabled:
        defect_types = [sample.defect_type for sample in datamodule.test_samples]
        validation = None
        if datamodule.holdout_samples:
            validation = synthetic_validation(model, datamodule.holdout_images(), cfg.seed)
        decisions = tune_and_log(cfg, out, defect_types, output_dir, validation=validation)
        metrics |= decisions.metrics
        save_bank(model, cfg, output_dir / BANK_FILE, decisions.travelling())
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_scores_csv(out, datamodule, output_dir / "scores.csv")
    render_run(output_dir, out)
    metrics["peak_rss_mb"] = peak_rss_mb()  # figures included: the whole run's peak
    log_metrics({"peak_rss_mb": metrics["peak_rss_mb"]})
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("%s: %s", cfg.category.name, result_line(metrics))
    return metrics, model, datamodule
