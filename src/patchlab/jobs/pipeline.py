"""One category, end to end: check data, build the bank, test, tune, write and log the results."""

import logging
import math
import resource
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patchlab.artifacts.bank import BANK_FILE, UNFINISHED_BANK_FILE, bank_digest, save_bank
from patchlab.artifacts.run_files import (
    CONFIG_FILE,
    METRICS_FILE,
    OUTPUTS_FILE,
    SCORES_FILE,
    TUNING_FILE,
    save_outputs,
    write_json,
    write_scores_csv,
)
from patchlab.artifacts.store import redact, study_storage
from patchlab.core.detector import PatchCore
from patchlab.core.metrics import evaluate_outputs
from patchlab.jobs import stages
from patchlab.jobs.build import build
from patchlab.jobs.tracking import NO_RUN, RunLog
from patchlab.training.datamodule import AnomalyDataModule
from patchlab.training.lightning_module import expected_warnings_silenced
from patchlab.training.memory import release_freed_memory

log = logging.getLogger(__name__)


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
    if math.isfinite(metrics.get("pixel_f1_max_threshold", math.nan)):  # NaN: no defect pixel
        decisions["pixel_threshold"] = metrics["pixel_f1_max_threshold"]
    return decisions | {
        "thresholds_from": "test set F1-max (threshold=none)",
        "operating_point": "f1 on the test set",
    }


def run(
    cfg: DictConfig, output_dir: Path, run_log: RunLog = NO_RUN
) -> tuple[dict[str, float], PatchCore, AnomalyDataModule]:
    """Fits and tests one category.

    The bank is saved as unfinished before testing, so a failure keeps it; the final bank and
    then metrics.json are written once everything else is, so their presence means the run
    finished. Only the MLflow model (which then holds the bank) is logged after them.
    """
    stages.enter("setup")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
    datamodule, module, trainer, tuning = build(cfg, stages.check)
    detector, samples = module.detector, datamodule.test_samples
    log.info("Model ready: %s", cfg.backbone.name)
    run_log.datasets(cfg.category.name, {"train": datamodule.train_samples, "test": samples})
    run_log.prepare_model()
    start = time.perf_counter()
    with expected_warnings_silenced():
        trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    bank_size = float(sum(len(bank) for bank in detector.banks))
    run_log.metrics({"fit_seconds": fit_seconds, "bank_size": bank_size})
    run_log.tags({"bank_sha256": bank_digest(detector.banks)})
    unfinished = output_dir / UNFINISHED_BANK_FILE
    save_bank(detector.banks, cfg, unfinished, statistics=detector.statistics)
    start = time.perf_counter()
    with expected_warnings_silenced():
        trainer.test(module, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    release_freed_memory()  # from here on: per-pixel buffers, freed back to the OS
    out = module.outputs
    save_outputs(out, output_dir / OUTPUTS_FILE)
    parts = tuning.split([sample.defect_type for sample in samples]) if tuning else {}
    evaluation = evaluate_outputs(out, parts)  # image-only: pixel metrics left out
    metrics = evaluation.metrics | {
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "bank_size": bank_size,
        "peak_rss_mb": peak_rss_mb(),
    }
    run_log.metrics(metrics)
    log.info("Metrics computed")
    decisions, found = untuned_decisions(metrics), None
    if tuning is not None:
        stages.enter("tuning")
        synthetic = None
        if datamodule.holdout_samples:
            images, valid = datamodule.holdout_images()
            from patchlab.tuning.synthetic import synthetic_validation  # only when used

            synthetic = synthetic_validation(detector.predict, images, valid, cfg.seed)
        name = f"{cfg.category.name}:{output_dir.resolve()}"
        tuning.storage = study_storage(tuning.storage, cfg.tracking, output_dir)
        types = [sample.defect_type for sample in samples]
        found = tuning.run(out, types, evaluation, parts, cfg.model.blur_sigma, name, synthetic)
        metrics |= found.metrics
        decisions = found.travelling() | {"thresholds_from": "validation (threshold=optuna)"}
        write_json(found.summary(tuning.storage), output_dir / TUNING_FILE)
        for line in found.lines():
            log.info("%s", line)
        run_log.params({f"tuned.{key}": value for key, value in found.params().items()})
        run_log.tags({"operating_point": found.label})  # a re-tune moves it; params cannot move
        run_log.metrics(found.metrics)
    stages.enter("writing results")
    write_scores_csv(out, samples, output_dir / SCORES_FILE)
    if cfg.figures.enabled:  # matplotlib and seaborn are imported only to draw
        from patchlab.reporting.render import RunView, render_run
        from patchlab.reporting.run_figures import Decision
        from patchlab.reporting.study_figures import write_study_figures

        post, decision = None, Decision(decisions["image_threshold"])
        if found is not None:
            post, judged = found.post, parts.get("held_out")
            decision = Decision(found.image_threshold, found.point, judged)
        view = RunView.of(cfg, out, samples, decision, post, evaluation)
        drawn = render_run(output_dir, view, cfg.figures)
        if found is not None and found.study is not None:
            drawn += write_study_figures(found.study, output_dir)
        log.info("Figures written: %d", len(drawn))
    ignore = datamodule.preprocessing.ignore
    save_bank(detector.banks, cfg, output_dir / BANK_FILE, decisions, detector.statistics, ignore)
    unfinished.unlink()
    metrics["peak_rss_mb"] = peak_rss_mb()  # this process's: the heatmaps' child is apart
    run_log.metrics({"peak_rss_mb": metrics["peak_rss_mb"]})
    write_json(metrics, output_dir / METRICS_FILE)
    log.info("Results written to %s", output_dir)
    run_log.model(output_dir / BANK_FILE, cfg.tracking)
    log.info("%s: %s", cfg.category.name, result_line(metrics))
    return metrics, detector, datamodule
