"""Re-tune an existing MLflow run from its cached maps, without re-extracting any features.

    patchlab tune RUN_ID [--n-trials 200] [--tracking-uri sqlite:///mlruns/mlflow.db]
    patchlab tune RUN_ID --objective false_reject --target 0.02    # another operating point
    patchlab tune RUN_ID --objective recall --target 1 --per-type

Reads the run's `test_outputs.safetensors`, `scores.csv` and `config.yaml`, runs the study
again, and logs the tuned parameters, metrics and plots back to the same run, under
`retuned_<time>.*` params (MLflow params cannot change once logged) and the run's
`operating_point` tag. A run trained with `threshold=none` is tuned with the defaults of
`threshold=optuna`. The run's bank keeps its decisions: predict and the served model decide
as the run was trained, so ship another operating point by training with it.
"""

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from patchlab.artifacts.run_files import (
    CONFIG_FILE,
    OUTPUTS_FILE,
    SCORES_FILE,
    TUNING_FILE,
    load_outputs,
    write_json,
)
from patchlab.artifacts.store import given_tracking_uri, study_storage
from patchlab.core.metrics import evaluate_outputs
from patchlab.errors import UserError, command_parser, exit_on_user_error
from patchlab.jobs.tracking import existing_run
from patchlab.reporting.study_figures import write_study_figures
from patchlab.tuning.operating_point import OBJECTIVES, OperatingPoint
from patchlab.tuning.study import ThresholdTuning, Tuning

PART_METRICS = ("val_", "held_out_")


def tuning_of(cfg: DictConfig) -> ThresholdTuning:
    """The run's own tuning settings, or the defaults (seeded and stored as the run was)."""
    tuning = instantiate(cfg.threshold) if cfg.get("threshold") is not None else None
    tuning = tuning or ThresholdTuning(seed=cfg.seed)
    tuning.storage = study_storage(tuning.storage, cfg.tracking, Path(cfg.tracking.root))
    return tuning


def retune(folder: Path, tuning: ThresholdTuning, cfg: DictConfig, run_id: str) -> Tuning:
    """Tunes again from the run files in `folder`, writing tuning.json and plots into it.

    The study is the run's re-tune study: a later re-tune of the same run replaces it."""
    with (folder / SCORES_FILE).open() as file:
        defect_types = [row["defect_type"] for row in csv.DictReader(file)]
    outputs = load_outputs(folder / OUTPUTS_FILE)
    tuning.validation = "test_split"  # the held-back images of synthetic validation are gone
    parts = tuning.split(defect_types)
    evaluation = evaluate_outputs(outputs, parts)
    name = f"{cfg.category.name}:run {run_id}:retune"
    found = tuning.run(outputs, defect_types, evaluation, parts, cfg.model.blur_sigma, name)
    found.metrics |= {k: v for k, v in evaluation.metrics.items() if k.startswith(PART_METRICS)}
    write_json(found.summary(tuning.storage), folder / TUNING_FILE)
    if found.study is not None:
        write_study_figures(found.study, folder)
    return found


def chosen_point(run_point: OperatingPoint, args: argparse.Namespace) -> OperatingPoint:
    """The run's operating point with the command line's changes; a flag that does not
    change it is refused rather than ignored."""
    if args.objective is None and (args.target is not None or args.per_type):
        raise UserError("--target and --per-type choose an objective's target: add --objective")
    if args.objective is None:
        return run_point
    changes = {"objective": args.objective, "target": args.target, "per_type": args.per_type}
    return dataclasses.replace(run_point, **changes)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("tune", __doc__)
    parser.add_argument("run_id")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the run's config")
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    parser.add_argument("--objective", choices=OBJECTIVES, default=None, help="default: the run's")
    parser.add_argument("--target", type=float, default=None, help="for false_reject and recall")
    parser.add_argument("--per-type", action="store_true", help="recall: for every defect type")
    args = parser.parse_args(argv)
    uri = given_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "retune"
        local.mkdir()
        try:
            for name in (OUTPUTS_FILE, SCORES_FILE, CONFIG_FILE):
                client.download_artifacts(args.run_id, name, str(local))
        except mlflow.exceptions.MlflowException as error:
            raise UserError(f"Could not read run {args.run_id} at {uri}: {error}") from error
        cfg = OmegaConf.load(local / CONFIG_FILE)
        tuning = tuning_of(cfg)
        if args.n_trials is not None:
            tuning.n_trials = args.n_trials
        tuning.operating_point = chosen_point(tuning.operating_point, args)
        found = retune(local, tuning, cfg, args.run_id)
        for name in (OUTPUTS_FILE, SCORES_FILE, CONFIG_FILE):
            (local / name).unlink()
        with existing_run(uri, args.run_id) as run_log:
            prefix = f"retuned_{time.strftime('%Y%m%dT%H%M%S')}"
            run_log.params({f"{prefix}.{k}": v for k, v in found.params().items()})
            run_log.metrics(found.metrics)
            run_log.tags({"operating_point": found.label})  # the point these metrics are at
            run_log.artifacts(local, "retune")
    print("\n".join(found.lines()), file=sys.stderr)
    print(json.dumps(found.metrics | found.travelling(), indent=2))


if __name__ == "__main__":
    main()
