"""MLflow: the embedded store, a real server over HTTP, parallel jobs, failures and the UI."""

import json
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers.configs import ROOT, compose_config, tracked, train_command
from helpers.mlflow_server import artifact_paths, mlflow_server
from helpers.synthetic import MVTEC_CATEGORIES, make_category
from patchlab.artifacts.bank import BANK_FILE
from patchlab.artifacts.store import LOCAL_UI, tracking_uri
from patchlab.core.metrics import evaluate
from patchlab.deploy.loading import fetch_source, load_detector
from patchlab.jobs.tracking import RUN_FILE
from patchlab.training.lightning_module import PatchCoreModule, expected_warnings_silenced


def only_run(uri: str) -> mlflow.entities.Run:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("patchcore")
    (found,) = client.search_runs([experiment.experiment_id])
    return found


def check_run(uri: str, metrics: dict[str, float]) -> mlflow.entities.Run:
    found = only_run(uri)
    assert found.info.status == "FINISHED" and found.data.tags["category"] == "bottle"
    params = found.data.params
    assert params["backbone.name"] == "resnet18" and params["model.coreset_ratio"] == "0.25"
    assert params["backbone.layers"] == "['layer2', 'layer3']" and "version.torch" in params
    assert found.data.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert {"peak_rss_mb", "aupro", "bank_size", "fit_seconds"} <= set(found.data.metrics)
    paths = artifact_paths(MlflowClient(uri), found.info.run_id)
    assert {"scores.csv", "metrics.json", "config.yaml"} <= paths
    assert any(p.startswith("heatmaps/") and p.endswith(".png") for p in paths)
    return found


def test_embedded_store_gets_params_metrics_and_artifacts(synthetic_root, tmp_path) -> None:
    store = tmp_path / "mlruns"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = tracked([f"data.root={synthetic_root}", f"tracking.root={store}"], tmp_path / "o")
    from_mlflow = [w for w in caught if "mlflow" in w.filename]
    assert not from_mlflow, [str(w.message) for w in from_mlflow]
    assert (store / "mlflow.db").is_file()
    run = check_run(f"sqlite:///{store / 'mlflow.db'}", metrics)
    assert run.info.run_name == "bottle resnet18 r0.25 k3 64px untuned"
    written = json.loads((tmp_path / "o" / RUN_FILE).read_text())  # the folder names its run
    assert written == {
        "run_id": run.info.run_id,
        "url": f"{LOCAL_UI}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
    }


def test_default_uri_is_the_sqlite_store_under_mlruns(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store is relative to where the user runs
    default = OmegaConf.load(ROOT / "conf" / "tracking" / "mlflow.yaml")
    assert tracking_uri(default) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert tracking_uri(compose_config(["tracking.uri=http://x:5000"]).tracking) == "http://x:5000"


def test_tracking_none_logs_nothing(synthetic_root, tmp_path) -> None:
    tracked(
        [f"data.root={synthetic_root}", "tracking=none", f"tracking.root={tmp_path}/m"],
        tmp_path / "o",
    )
    assert not (tmp_path / "m").exists() and (tmp_path / "o" / "metrics.json").is_file()


def test_the_logged_model_holds_the_only_copy_of_the_bank_and_reproduces_the_run(
    synthetic_root, tmp_path
) -> None:
    store = tmp_path / "mlruns"
    overrides = [f"data.root={synthetic_root}", f"tracking.root={store}"]
    metrics = tracked(overrides, tmp_path / "o")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    run_id = only_run(uri).info.run_id
    assert BANK_FILE not in artifact_paths(MlflowClient(uri), run_id)  # uploaded once
    local = fetch_source(run_id, uri, tmp_path / "fetched")
    assert local.parts[-2:] == ("artifacts", BANK_FILE)  # inside the logged model
    detector, cfg, metadata = load_detector(local)
    assert metadata["backbone"] == "resnet18"
    data = instantiate(cfg.data)
    data.setup()
    module = PatchCoreModule(detector)
    with expected_warnings_silenced():
        trainer = pl.Trainer(logger=False, enable_progress_bar=False)
        trainer.test(module, datamodule=data, verbose=False)
    out = module.outputs
    again = evaluate(out.image_scores, out.labels, out.maps, out.masks).metrics
    assert again == {k: metrics[k] for k in again}


def test_retune_cli_tunes_a_threshold_none_run(synthetic_root, tmp_path) -> None:
    """`python -m patchlab.tune` on a run trained without tuning uses the optuna defaults."""
    store = tmp_path / "mlruns"
    tracked([f"data.root={synthetic_root}", f"tracking.root={store}"], tmp_path / "o")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    run_id = only_run(uri).info.run_id
    command = [sys.executable, "-m", "patchlab.tune", run_id, "--n-trials", "3"]
    command += ["--objective", "false_reject", "--target", "0.34"]  # another operating point
    done = subprocess.run(
        [*command, "--tracking-uri", uri], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert {"post_processing", "image_threshold", "pixel_f1"} <= set(json.loads(done.stdout))
    assert "validation false-reject rate 0.000 (95% CI" in done.stderr
    assert "; target <= 0.34" in done.stderr
    retuned = only_run(uri).data
    assert "pixel_f1" in retuned.metrics and "val_pixel_f1_tuned" in retuned.metrics
    points = [v for k, v in retuned.params.items() if k.endswith(".operating_point")]
    assert points == ["false_reject<=0.34"] and retuned.tags["operating_point"] == points[0]
    assert (store / "optuna.db").is_file()


def test_failed_run_is_marked_and_keeps_what_it_logged(synthetic_root, tmp_path) -> None:
    store = tmp_path / "mlruns"
    with pytest.raises(ValueError, match="num_neighbors=500"):
        tracked(
            [f"data.root={synthetic_root}", f"tracking.root={store}", "model.num_neighbors=500"],
            tmp_path / "o",
        )
    found = only_run(f"sqlite:///{store / 'mlflow.db'}")
    assert found.info.status == "FAILED" and "num_neighbors=500" in found.data.tags["error"]
    assert found.data.params["model.num_neighbors"] == "500"


def search_runs_over_rest(url: str) -> list[dict]:
    """What the UI itself asks: POST runs/search for every experiment."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/experiments/search",
        data=b'{"max_results": 100}',
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        ids = [e["experiment_id"] for e in json.load(response)["experiments"]]
    body = json.dumps({"experiment_ids": ids, "max_results": 1000}).encode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)["runs"]


@pytest.mark.slow
def test_fifteen_category_sweep_lands_in_the_store_and_the_ui(tmp_path) -> None:
    root = tmp_path / "mvtec"
    for seed, name in enumerate(MVTEC_CATEGORIES):
        make_category(root, name, size=32, train=4, good=1, defects=1, seed=seed)
    command = train_command(root, tmp_path, "-m", "category=glob(*)")
    command += [
        "data.geometry.resize=32",
        "data.geometry.crop_size=32",
        f"tracking.root={tmp_path}/mlruns",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "multirun"
    written = sorted(p.parent.name for p in sweep_dir.glob("*/metrics.json"))
    assert written == sorted(MVTEC_CATEGORIES)
    summary = (sweep_dir / "summary.md").read_text()
    assert all(f"| {c} | ok |" in summary for c in MVTEC_CATEGORIES) and "| mean |" in summary
    assert (sweep_dir / "summary_bars.png").stat().st_size > 10_000
    with mlflow_server(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", ui=True) as url:
        runs = search_runs_over_rest(url)
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    assert all(r["info"]["status"] == "FINISHED" for r in runs)
    assert sorted(t["category"] for t in tags if "category" in t) == sorted(MVTEC_CATEGORIES)
    assert sum(t.get("summary") == "true" for t in tags) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    one = next(r for r in runs if r["info"]["run_name"].startswith("bottle "))["info"]["run_id"]
    assert ".hydra/config.yaml" in artifact_paths(client, one)
    assert len({t["sweep"] for t in tags}) == 1


def sweep_runs(store: Path) -> tuple[MlflowClient, list[mlflow.entities.Run]]:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("patchcore")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.patchlab"])
    assert "metrics.`image_auroc`" in view["selectedColumns"]
    return client, client.search_runs([experiment.experiment_id])


def sweep_report(tmp_path: Path) -> str:
    """`patchlab report --sweep` on the sweep under tmp_path, as a user runs it; its markdown."""
    command = [sys.executable, "-m", "patchlab.report", f"--sweep={tmp_path / 'multirun'}"]
    command += [f"--tracking-uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"]
    command += [f"--out={tmp_path / 'report'}"]
    report = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-3000:]
    return (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_failed_own_category_shows_in_sweep_summary_and_report(tmp_path) -> None:
    root = tmp_path / "parts"
    for seed, name in enumerate(("gear", "hinge", "valve")):
        make_category(root, name, size=32, train=4, good=1, defects=1, seed=seed)
    for image in (root / "hinge" / "train" / "good").iterdir():
        image.unlink()
    command = train_command(root, tmp_path, "-m", "category.name=gear,hinge,valve")
    command += ["data.geometry.resize=32", "data.geometry.crop_size=32"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]
    _, runs = sweep_runs(tmp_path / "mlruns")
    status = {r.data.tags.get("category", "sweep"): r.info.status for r in runs}
    assert status == {"gear": "FINISHED", "valve": "FINISHED", "hinge": "FAILED", "sweep": "FAILED"}
    failed = next(r for r in runs if r.data.tags.get("category") == "hinge")
    assert failed.data.tags["error"].startswith("UserError: No training images")
    summary = (tmp_path / "multirun" / "summary.md").read_text()
    assert "| mean | 2/3 ok |" in summary and "**hinge FAILED**: UserError: No training" in summary
    assert "seed_" not in summary  # the seed has no numbers for these parts
    assert (tmp_path / "multirun" / "summary_bars.png").stat().st_size > 10_000
    markdown = sweep_report(tmp_path)
    assert "| mean | 2/3 ok |" in markdown and "| hinge | FAILED |" in markdown
    assert "**hinge FAILED**: UserError: No training images" in markdown
    assert (tmp_path / "report" / "assets" / "summary_bars.png").stat().st_size > 10_000
    assert "resnet18" in markdown and "32/32" in markdown  # the settings that tell runs apart


@pytest.mark.slow
def test_a_sweep_over_operating_points_keeps_each_job_and_reports_its_decisions(
    synthetic_root, tmp_path
) -> None:
    """Three jobs of one category that differ in a setting other than the category: each
    gets its own folder, the summary lists each job's decisions, and the report each run's."""
    point = "threshold.operating_point"
    command = train_command(synthetic_root, tmp_path, "-m", "category=bottle", "threshold=optuna")
    command += ["threshold.n_trials=3", f"{point}.objective=false_reject"]
    command += [f"{point}.target=0,0.5,1", "data.geometry.resize=32", "data.geometry.crop_size=32"]
    command += ["figures.count=1"]  # the report's worst case: one heatmap is enough
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert folders == [f"bottle_{point}.target={t}" for t in ("0", "0.5", "1")]
    summary = (tmp_path / "multirun" / "summary.md").read_text()
    for target in ("0", "0.5", "1"):
        assert (
            f"### bottle_{point}.target={target}: operating point false_reject<={target},"
            in summary
        )
    assert summary.count("| recall of scratch |") == 3
    markdown = sweep_report(tmp_path)
    assert markdown.count("operating point false_reject<=") == 3
    assert markdown.count("| recall of stain |") == 3
    assert markdown.count("_heatmaps_000_") == 2 * 3  # the worst case: alt text and file
