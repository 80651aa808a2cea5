"""The Optuna study of a finished run, timed on its cached maps: what `threshold=optuna` costs.

    python benchmarks/bench_tuning.py RUN_DIR                 # the run's own tuning settings
    python benchmarks/bench_tuning.py RUN_DIR --n-trials 100 --storage sqlite:///study.db

RUN_DIR is a run's output folder (config.yaml and test_outputs.safetensors), e.g. from
`python train.py +preset=quality category.name=magnetic_tile data.root=../shared/data/surfaces`.
Prints the study's wall time, seconds per trial and the best validation F1. The storage
defaults to memory, so that only the trials are timed; pass one to add its cost.
"""

import argparse
import csv
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from patchlab.artifacts.run_files import CONFIG_FILE, OUTPUTS_FILE, SCORES_FILE, load_outputs
from patchlab.core.metrics import evaluate_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-trials", type=int, default=100)
    parser.add_argument("--storage", default=None)
    args = parser.parse_args()
    cfg = OmegaConf.load(args.run_dir / CONFIG_FILE)
    tuning_cfg = cfg.threshold or OmegaConf.load(
        Path(__file__).parents[1] / "conf/threshold/optuna.yaml"
    )
    tuning = instantiate(tuning_cfg, n_trials=args.n_trials, storage=args.storage)
    outputs = load_outputs(args.run_dir / OUTPUTS_FILE)
    with (args.run_dir / SCORES_FILE).open() as scores:
        defect_types = [row["defect_type"] for row in csv.DictReader(scores)]
    parts = tuning.split(defect_types)
    evaluation = evaluate_outputs(outputs, parts)
    validation = outputs.subset(parts["val"])
    pixels = validation.masks.numel()
    print(f"{args.run_dir}: {len(validation.labels)} validation images, {pixels / 1e6:.1f}M pixels")
    started = time.perf_counter()
    found = tuning.run(outputs, evaluation, parts, cfg.model.blur_sigma, "bench")
    seconds = time.perf_counter() - started
    print(
        f"study of {args.n_trials} trials: {seconds:.1f} s "
        f"({seconds / args.n_trials:.2f} s/trial), "
        f"best validation F1 {found.metrics['val_pixel_f1_tuned']:.4f}, "
        f"threshold-only {found.metrics['val_pixel_f1_threshold_only']:.4f}"
    )
    print("best:", found.post)


if __name__ == "__main__":
    main()
