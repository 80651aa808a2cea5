"""MLflow: the embedded store, a real server over HTTP, parallel jobs, failures and the UI."""

import json
import subprocess
import urllib.request
import warnings
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import ROOT, compose_config, tracked, train_command
from mlflow_server import mlflow_server
from patchlab.artifacts import BANK_FILE
from patchlab.bank_io import load_model, read_bank
from patchlab.metrics import evaluate
from patchlab.tracking import tracking_uri
from synthetic import MVTEC_CATEGORIES, make_category


def only_run(uri: str) -> mlflow.entities.Run:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("patchcore")
    (found,) = client.search_runs([experiment.experiment_id])
    return found


def artifact_paths(uri: str, run_id: str, path: str = "") -> set[str]:
    client = MlflowClient(uri)
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(uri, run_id, item.path) if item.is_dir else {item.path}
    return paths


def check_run(uri: str, metrics: dict[str, float]) -> mlflow.entities.Run:
    found = only_run(uri)
    assert found.info.status == "FINISHED" and found.data.tags["category"] == "bottle"
    params = found.data.params
    assert params["backbone.name"] == "resnet18" and params["model.coreset_ratio"] == "0.25"
    assert params["backbone.layers"] == "['layer2', 'layer3']" and "version.torch" in params
    assert found.data.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert {"peak_rss_mb", "aupro", "bank_size", "fit_seconds"} <= set(found.data.metrics)
    paths = artifact_paths(uri, found.info.run_id)
    assert {BANK_FILE, "scores.csv", "metrics.json", "config.yaml"} <= paths
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
    check_run(f"sqlite:///{store / 'mlflow.db'}", metrics)


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


def test_reloaded_bank_reproduces_the_test_metrics(synthetic_root, tmp_path) -> None:
    store = tmp_path / "mlruns"
    overrides = [f"data.root={synthetic_root}", f"tracking.root={store}"]
    metrics = tracked(overrides, tmp_path / "o")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    local = MlflowClient(uri).download_artifacts(
        only_run(uri).info.run_id, BANK_FILE, str(tmp_path)
    )
    model, cfg = load_model(Path(local))
    assert read_bank(Path(local))[1]["backbone"] == "resnet18"
    data = instantiate(cfg.data)
    data.setup()
    pl.Trainer(logger=False, enable_progress_bar=False).test(model, datamodule=data, verbose=False)
    out = model.outputs
    again = evaluate(out.image_scores, out.labels, out.maps, out.masks)
    assert {k: again[k] for k in again} == {k: metrics[k] for k in again}


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


@pytest.mark.slow
def test_real_mlflow_server_over_http(synthetic_root, tmp_path) -> None:
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend, tmp_path / "artifacts") as url:
        metrics = tracked([f"data.root={synthetic_root}", f"tracking.uri={url}"], tmp_path / "o")
        check_run(url, metrics)
    assert any((tmp_path / "artifacts").rglob(BANK_FILE))


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
    command += ["data.resize=32", "data.crop_size=32", f"tracking.root={tmp_path}/mlruns"]
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
    one = next(r for r in runs if r["info"]["run_name"] == "bottle")["info"]["run_id"]
    assert ".hydra/config.yaml" in artifact_paths(client._tracking_client.tracking_uri, one)
    assert len({t["sweep"] for t in tags}) == 1


@pytest.mark.slow
def test_parallel_jobs_and_a_failing_category(tmp_path) -> None:
    root = tmp_path / "mvtec"
    for seed, name in enumerate(("bottle", "cable", "capsule")):
        make_category(root, name, size=32, train=4, good=1, defects=1, seed=seed)
    for image in (root / "cable" / "train" / "good").iterdir():
        image.unlink()
    command = train_command(root, tmp_path, "-m", "category=bottle,cable,capsule")
    command += [
        "data.resize=32",
        "data.crop_size=32",
        f"tracking.root={tmp_path}/mlruns",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("patchcore").experiment_id])
    status = {r.data.tags.get("category", "summary"): r.info.status for r in runs}
    assert status == {
        "bottle": "FINISHED",
        "capsule": "FINISHED",
        "cable": "FAILED",
        "summary": "FINISHED",
    }
    failed = next(r for r in runs if r.data.tags.get("category") == "cable")
    assert "No training images" in failed.data.tags["error"]
    assert (
        "**cable FAILED**: ValueError: No training images"
        in (tmp_path / "multirun" / "summary.md").read_text()
    )
