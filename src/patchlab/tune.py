"""Re-tune an existing MLflow run from its cached maps, without re-extracting any features.

    python -m patchlab.tune RUN_ID [--n-trials 200] [--tracking-uri sqlite:///mlruns/mlflow.db]

Reads the run's `test_outputs.safetensors`, `scores.csv` and `config.yaml`, runs the study
again, and logs the tuned parameters, metrics and plots back to the same run.
"""

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from patchlab.artifacts import OUTPUTS_FILE, load_outputs
from patchlab.tracking import tracking_uri, tracking_uri_set
from patchlab.tuning.study import tune_and_log


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_id")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the run's config")
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    args = parser.parse_args()
    uri = args.tracking_uri or tracking_uri(OmegaConf.load(Path("conf/tracking/mlflow.yaml")))
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        for name in (OUTPUTS_FILE, "scores.csv", "config.yaml"):
            client.download_artifacts(args.run_id, name, str(local))
        cfg = OmegaConf.load(local / "config.yaml")
        if "enabled" not in cfg.threshold or not cfg.threshold.get("search_space"):
            cfg.threshold = OmegaConf.load(Path("conf/threshold/optuna.yaml"))
            cfg.threshold.seed = cfg.seed
            cfg.threshold.storage = f"sqlite:///{Path(cfg.tracking.root) / 'optuna.db'}"
        if args.n_trials is not None:
            cfg.threshold.n_trials = args.n_trials
        with (local / "scores.csv").open() as file:
            defect_types = [row["defect_type"] for row in csv.DictReader(file)]
        output_dir = local / "retune"
        output_dir.mkdir()
        with tracking_uri_set(uri), mlflow.start_run(run_id=args.run_id):
            prefix = f"retuned_{time.strftime('%Y%m%dT%H%M%S')}"
            outputs = load_outputs(local / OUTPUTS_FILE)
            tuning = tune_and_log(cfg, outputs, defect_types, output_dir, prefix)
            mlflow.log_artifacts(str(output_dir), "retune")
    print(json.dumps(tuning.metrics | tuning.travelling(), indent=2))


if __name__ == "__main__":
    main()
