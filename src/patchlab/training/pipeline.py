"""One category, end to end: check data, build the bank, test, write and log the results."""

import ctypes
import ctypes.util
import logging
import resource
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patchlab.core.metrics import evaluate
from patchlab.data.datamodule import AnomalyDataModule
from patchlab.deploy.pyfunc import log_model
from patchlab.outputs import (
    BANK_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    OUTPUTS_FILE,
    SCORES_FILE,
    UNFINISHED_BANK_FILE,
    bank_digest,
    save_bank,
    save_outputs,
    write_json,
    write_scores_csv,
)
from patchlab.reporting.render import render_run
from patchlab.tracking.runs import log_datasets, log_metrics, log_tags
from patchlab.training import stages
from patchlab.training.build import build
from patchlab.training.lightning_module import PatchCore, expected_warnings_silenced
from patchlab.tuning.synthetic import synthetic_validation

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


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


def untuned_decisions(metrics: dict[str, float]) -> dict:
    """Without threshold=optuna, predict decides at the test set's F1-optimal thresholds.

    Those were read off the test set, as the seed did; the bank says so, and predict warns.
    """
    decisions = {"image_threshold": metrics.get("image_f1_max_threshold")}
    if "pixel_f1_max_threshold" in metrics:
        decisions["pixel_threshold"] = metrics["pixel_f1_max_threshold"]
    return decisions | {"thresholds_from": "test set F1-max (threshold=none)"}


def run(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, float], PatchCore, AnomalyDataModule]:
    """Fits and tests one category.

    The bank is saved as unfinished before testing, so a failure keeps it; the final bank and
    then metrics.json are written once everything else is, so their presence means the run
    finished. Only the MLflow model is logged after them, with stop signals held.
    """
    release_freed_memory()
    stages.enter("setup")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    datamodule, model, trainer, tuning = build(cfg)
    splits = {"train": datamodule.train_samples, "test": datamodule.test_samples}
    log_datasets(cfg.category.name, splits)
    start = time.perf_counter()
    with expected_warnings_silenced():
        trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    bank_size = float(sum(len(bank) for bank in model.banks))
    log_metrics({"fit_seconds": fit_seconds, "bank_size": bank_size})
    log_tags({"bank_sha256": bank_digest(model.banks)})
    unfinished = output_dir / UNFINISHED_BANK_FILE
    save_bank(model.banks, cfg, unfinished, statistics=model.statistics)
    start = time.perf_counter()
    with expected_warnings_silenced():
        trainer.test(model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    out = model.outputs
    save_outputs(out, output_dir / OUTPUTS_FILE)
    masks = out.masks if out.pixel_labelled else None  # image-only: pixel metrics left out
    metrics = evaluate(out.image_scores, out.labels, out.maps, masks) | {
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "bank_size": bank_size,
        "peak_rss_mb": peak_rss_mb(),
    }
    log_metrics(metrics)
    if tuning is not None:
        stages.enter("tuning")
        defect_types = [sample.defect_type for sample in datamodule.test_samples]
        validation = None
        if datamodule.holdout_samples:
            images = datamodule.holdout_images()
            validation = synthetic_validation(model.predict, images, cfg.seed)
        name = f"{cfg.category.name}:{output_dir.resolve()}"
        found = tuning.run_and_log(
            out, defect_types, output_dir, cfg.model.blur_sigma, name, validation=validation
        )
        metrics |= found.metrics
        decisions = found.travelling() | {"thresholds_from": "validation (threshold=optuna)"}
    else:
        decisions = untuned_decisions(metrics)
    stages.enter("writing results")
    write_scores_csv(out, datamodule.test_samples, output_dir / SCORES_FILE)
    render_run(output_dir, out)
    save_bank(model.banks, cfg, output_dir / BANK_FILE, decisions, model.statistics)
    unfinished.unlink()
    metrics["peak_rss_mb"] = peak_rss_mb()  # figures included: the whole run's peak
    log_metrics({"peak_rss_mb": metrics["peak_rss_mb"]})
    write_json(metrics, output_dir / METRICS_FILE)
    if model.is_ensemble:
        log.warning("Not logging a servable model: predict and export take one backbone")
    else:
        with stages.held():  # an upload of the finished bank: not cut in half
            log_model(output_dir / BANK_FILE, cfg.tracking)
    log.info("%s: %s", cfg.category.name, result_line(metrics))
    return metrics, model, datamodule
