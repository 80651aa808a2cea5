"""Re-tune an existing MLflow run from its cached maps, without re-extracting any features.

    python -m patchlab.tune RUN_ID [--n-trials 200] [--tracking-uri sqlite:///mlruns/mlflow.db]

Reads the run's `test_outputs.safetensors`, `scores.csv` and `config.yaml`, runs the study
again, and logs the tuned parameters, metrics and plots back to the same run. A run trained
with `threshold=none` is tuned with the defaults of `threshold=optuna`.
"""

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import mlflow
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from patchlab.errors import exit_on_user_error
from patchlab.outputs import CONFIG_FILE, OUTPUTS_FILE, SCORES_FILE, load_outputs
from patchlab.tracking.runs import default_tracking_uri, tracking_uri_set
from patchlab.tuning.study import ThresholdTuning


def tuning_of(cfg: DictConfig) -> ThresholdTuning:
    """The run's own tuning settings, or the defaults (seeded and stored as the run was).

    Runs from before tuning became a config object have `threshold.enabled` and no
    `_target_`; they get the defaults too.
    """
    node = cfg.get("threshold")
    if node is not None and "_target_" in node:
        return instantiate(node)
    storage = f"sqlite:///{Path(cfg.tracking.root).resolve() / 'optuna.db'}"
    return ThresholdTuning(seed=cfg.seed, storage=storage)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_id")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the run's config")
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    args = parser.parse_args()
    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        for name in (OUTPUTS_FILE, SCORES_FILE, CONFIG_FILE):
            client.download_artifacts(args.run_id, name, str(local))
        cfg = OmegaConf.load(local / CONFIG_FILE)
        tuning = tuning_of(cfg)
        if args.n_trials is not None:
            tuning.n_trials = args.n_trials
        with (local / SCORES_FILE).open() as file:
            defect_types = [row["defect_type"] for row in csv.DictReader(file)]
        output_dir = local / "retune"
        output_dir.mkdir()
        with tracking_uri_set(uri), mlflow.start_run(run_id=args.run_id):
            prefix = f"retuned_{time.strftime('%Y%m%dT%H%M%S')}"
            outputs = load_outputs(local / OUTPUTS_FILE)
            name = f"{cfg.category.name}:{output_dir.resolve()}"
            found = tuning.run_and_log(
                outputs, defect_types, output_dir, cfg.model.blur_sigma, name, prefix
            )
            mlflow.log_artifacts(str(output_dir), "retune")
    print(json.dumps(found.metrics | found.travelling(), indent=2))


if __name__ == "__main__":
    main()
