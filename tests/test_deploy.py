"""A trained model in use: predict, safe loading, exported graphs, the MLflow model and serving."""

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from helpers.configs import tracked
from helpers.mlflow_server import model_server
from patchlab.artifacts.bank import BANK_FILE, bank_config, read_banks, save_bank
from patchlab.artifacts.run_files import load_outputs
from patchlab.data.mvtec import read_image
from patchlab.deploy.export import export
from patchlab.deploy.loading import load_predictor
from patchlab.deploy.predict import main as predict_main
from patchlab.errors import UserError
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at

MODEL = "synthetic_bottle"


class TrainedRun:
    """A finished, tracked run: its folder, store URI, run id and test images."""

    def __init__(self, out: Path, store: Path, category: Path) -> None:
        self.out, self.category = out, category.resolve()  # scores.csv holds resolved paths
        self.uri = f"sqlite:///{store / 'mlflow.db'}"
        (run,) = MlflowClient(self.uri).search_runs(
            [MlflowClient(self.uri).get_experiment_by_name("patchcore").experiment_id]
        )
        self.run_id = run.info.run_id
        with (out / "scores.csv").open() as file:
            self.scores = {row["path"]: float(row["image_score"]) for row in csv.DictReader(file)}
        self.tuning = json.loads((out / "tuning.json").read_text())


def train(root: Path, tmp: Path, *overrides: str) -> TrainedRun:
    store = tmp / "mlruns"
    settings = [f"data.root={root}", f"tracking.root={store}", "threshold=optuna", *overrides]
    tracked(settings, tmp / "run")
    return TrainedRun(tmp / "run", store, root / "bottle")


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    tmp = tmp_path_factory.mktemp("trained")
    return train(synthetic_root, tmp, "threshold.n_trials=10", f"tracking.register_model={MODEL}")


def predictions(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "predictions.csv").open() as file:
        return {row["path"]: row for row in csv.DictReader(file)}


def check_predict_matches_the_run(trained: TrainedRun, out: Path, tolerance: float) -> None:
    """Scores equal scores.csv, decisions and masks are the tuned post-processing's."""
    rows = predictions(out)
    assert set(rows) == set(trained.scores)
    threshold = trained.tuning["image_threshold"]
    for path, row in rows.items():
        score = float(row["image_score"])
        assert score == pytest.approx(trained.scores[path], rel=tolerance, abs=tolerance)
        assert row["anomalous"] == str(int(score >= threshold)), path
        name = Path(path).relative_to(trained.category / "test").with_suffix(".png")
        mask = np.array(Image.open(out / "masks" / name))
        assert mask.shape == np.array(Image.open(path)).shape[:2]
        assert int(row["defect_area_px"]) == int((mask == 255).sum())
    # At input resolution, in the run's batches (convolution rounding depends on the batch),
    # scores, maps and masks are exactly the test pass's and tuning's post-processing of them.
    predictor = load_predictor(trained.out / BANK_FILE)
    outputs = load_outputs(trained.out / "test_outputs.safetensors")
    post = PostProcessing(**trained.tuning["post_processing"])
    images = [read_image(Path(p)) for p in trained.scores]
    batch = OmegaConf.load(trained.out / "config.yaml").data.batch_size
    parts = [predictor.input_results(images[i : i + batch]) for i in range(0, len(images), batch)]
    scores, maps, masks = (torch.cat(column) for column in zip(*parts, strict=True))
    assert torch.equal(scores, outputs.image_scores)
    assert torch.equal(maps, maps_at(outputs, post.sigma))
    assert torch.equal(masks, binarize(maps_at(outputs, post.sigma), post))


def test_predict_from_a_run_id_reproduces_the_run(trained: TrainedRun, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "patchlab.predict",
        trained.run_id,
        str(trained.category / "test"),
    ]
    command += ["--out", str(tmp_path / "pred"), "--tracking-uri", trained.uri, "--overlays"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s" in result.stdout
    check_predict_matches_the_run(trained, tmp_path / "pred", 0.0)
    assert len(list((tmp_path / "pred" / "overlays").rglob("*.png"))) == len(trained.scores)


def test_predict_from_the_registry_by_alias(trained: TrainedRun, tmp_path: Path) -> None:
    source = f"models:/{MODEL}@champion"
    out = tmp_path / "pred"
    predict_main(
        [source, str(trained.category / "test"), "--out", str(out), "--tracking-uri", trained.uri]
    )
    rows = predictions(out)
    scores = {path: float(row["image_score"]) for path, row in rows.items()}
    assert scores == trained.scores  # at the run's batch size: bit-identical


def test_maps_and_masks_come_out_at_each_inputs_size(trained: TrainedRun, tmp_path: Path) -> None:
    source = next(iter(trained.scores))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.open(source).resize((96, 80)).save(inputs / "wide.png")
    Image.open(source).convert("L").resize((50, 70)).save(inputs / "tall_gray.jpg")
    predict_main([str(trained.out), str(inputs), "--out", str(tmp_path / "pred")])
    for name, shape in (("wide", (80, 96)), ("tall_gray", (70, 50))):
        assert np.array(Image.open(tmp_path / "pred" / "masks" / f"{name}.png")).shape == shape
        assert np.array(Image.open(tmp_path / "pred" / "maps" / f"{name}.png")).shape == shape


def test_an_unreadable_file_is_reported_and_the_rest_go_on(trained, tmp_path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in list(trained.scores)[:2]:
        shutil.copy(path, inputs / Path(path).name)
    (inputs / "broken.png").write_bytes(b"")
    with pytest.raises(SystemExit) as stopped:
        predict_main([str(trained.out / BANK_FILE), str(inputs), "--out", str(tmp_path / "p")])
    assert stopped.value.code == 1
    rows = predictions(tmp_path / "p")
    assert len(rows) == 3
    broken = rows[str((inputs / "broken.png").resolve())]
    assert "broken.png" in broken["error"] and broken["image_score"] == ""
    assert all(row["error"] == "" for path, row in rows.items() if "broken" not in path)


def test_a_missing_input_is_a_clear_error(trained: TrainedRun, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        predict_main([str(trained.out), str(tmp_path / "nowhere" / "*.png"), "--out", "x"])
    assert "no glob match" in capsys.readouterr().err


def crafted_bank(trained: TrainedRun, path: Path, **changes: object) -> Path:
    (bank,), _, metadata = read_banks(trained.out / BANK_FILE)
    cfg = OmegaConf.merge(bank_config(trained.out / BANK_FILE, metadata), changes)
    save_bank([bank], cfg, path, json.loads(metadata["extra"]))
    return path


def test_a_crafted_target_is_refused_and_never_run(trained, tmp_path) -> None:
    marker = tmp_path / "pwned"
    backbone = {"_target_": "os.system", "command": f"touch {marker}"}
    path = crafted_bank(trained, tmp_path / BANK_FILE, backbone=backbone)
    with pytest.raises(UserError, match=r"backbone._target_ is 'os.system'"):
        load_predictor(path)
    with pytest.raises(UserError, match="refused to load"):
        export(path, "onnx", tmp_path / "export")
    search = {"_target_": "os.system", "command": f"touch {marker}"}
    with pytest.raises(UserError, match=r"search._target_ is 'os.system'"):
        load_predictor(crafted_bank(trained, tmp_path / "search.safetensors", search=search))
    nested = {"weights": {"_target_": "os.system", "command": f"touch {marker}"}}
    with pytest.raises(UserError, match=r"backbone.weights._target_ is 'os.system'"):
        load_predictor(crafted_bank(trained, tmp_path / "nested.safetensors", backbone=nested))
    assert not marker.exists()


def test_a_bank_that_does_not_fit_its_backbone_is_refused(trained, tmp_path) -> None:
    (bank,), _, metadata = read_banks(trained.out / BANK_FILE)
    cfg = bank_config(trained.out / BANK_FILE, metadata)
    save_bank([bank[:, :64]], cfg, tmp_path / BANK_FILE, json.loads(metadata["extra"]))
    with pytest.raises(UserError, match="has 64 features per patch, but backbone resnet18"):
        load_predictor(tmp_path / BANK_FILE)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_graphs_match_torch(trained: TrainedRun, tmp_path: Path, fmt: str) -> None:
    export(trained.out / BANK_FILE, fmt, tmp_path / fmt)
    images = [read_image(Path(p)) for p in trained.scores]
    reference = load_predictor(trained.out / BANK_FILE).predict(images)
    exported = load_predictor(tmp_path / fmt / BANK_FILE, engine=fmt).predict(images)
    for ours, theirs in zip(reference, exported, strict=True):
        assert theirs.score == pytest.approx(ours.score, rel=1e-4)
        np.testing.assert_allclose(theirs.map, ours.map, rtol=1e-4, atol=1e-4)


def test_pyfunc_model_from_the_registry_in_a_fresh_process(trained: TrainedRun) -> None:
    paths = list(trained.scores)[:3]
    encoded = base64.b64encode(Path(paths[2]).read_bytes()).decode()
    columns = {"path": [*paths[:2], None], "image": [None, None, encoded]}
    code = (
        "import sys, json, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        f"result = model.predict(pd.DataFrame({columns!r}), params={{'return_maps': True}})\n"
        "maps = int(result.map_png.notna().sum())\n"
        "print(json.dumps({'scores': list(result.image_score), 'maps': maps}))\n"
    )
    env = {"MLFLOW_TRACKING_URI": trained.uri}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ | env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["scores"] == pytest.approx([trained.scores[p] for p in paths], rel=1e-5)
    assert answer["maps"] == 3


def test_every_run_logs_a_model_with_a_signature(trained: TrainedRun) -> None:
    mlflow.set_tracking_uri(trained.uri)
    try:
        info = mlflow.models.get_model_info(f"models:/{MODEL}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert {"path", "image"} <= set(info.signature.inputs.input_names())
    assert info.run_id == trained.run_id


def serve_and_post(model_uri: str, tracking_uri: str, paths: list[str]) -> list[float]:
    rows = [[base64.b64encode(Path(p).read_bytes()).decode()] for p in paths]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    with model_server(model_uri, tracking_uri) as url:
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    return [row["image_score"] for row in answer["predictions"]]


@pytest.mark.slow
def test_mlflow_models_serve_answers_posted_images(trained: TrainedRun) -> None:
    paths = list(trained.scores)[-3:]
    scores = serve_and_post(f"models:/{MODEL}@champion", trained.uri, paths)
    assert scores == pytest.approx([trained.scores[p] for p in paths], rel=1e-5)


@pytest.fixture(scope="module")
def real_bottle(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """Bottle at the seed's preprocessing with Lite2, a 1% coreset to keep the suite short."""
    tmp = tmp_path_factory.mktemp("real")
    return train(
        real_data_root,
        tmp,
        "backbone=efficientnet_lite2",
        "data.geometry.resize=256",
        "data.geometry.crop_size=224",
        "data.batch_size=32",
        "data.num_workers=2",
        "model.coreset_ratio=0.01",
        "model.num_neighbors=9",
        "threshold.n_trials=30",
        "tracking.register_model=bottle",
    )


@pytest.mark.real_data
def test_real_bottle_training_reaches_the_recipes_numbers(real_bottle: TrainedRun) -> None:
    """The run every real-bottle test uses, trained once: train.py's own path on real data."""
    metrics = json.loads((real_bottle.out / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.99 and metrics["pixel_auroc"] >= 0.97, metrics
    assert metrics["pixel_f1"] >= 0.72, metrics  # tuned on validation, scored on held-out images
    assert metrics["val_pixel_f1_tuned"] >= metrics["val_pixel_f1_threshold_only"] - 1e-6


@pytest.mark.real_data
def test_real_bottle_predict_from_run_id(real_bottle: TrainedRun, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "patchlab.predict", real_bottle.run_id]
    command += [str(real_bottle.category / "test"), "--out", str(tmp_path / "pred")]
    command += ["--tracking-uri", real_bottle.uri]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_predict_matches_the_run(real_bottle, tmp_path / "pred", 0.0)
    mask = Image.open(next((tmp_path / "pred" / "masks").rglob("*.png")))
    assert mask.size == (900, 900)


@pytest.mark.real_data
def test_real_bottle_exports_match_torch(real_bottle: TrainedRun, tmp_path: Path) -> None:
    images = [read_image(Path(p)) for p in list(real_bottle.scores)[::10]]
    reference = load_predictor(real_bottle.out / BANK_FILE).predict(images)
    for fmt in ("onnx", "openvino"):
        export(real_bottle.out / BANK_FILE, fmt, tmp_path / fmt)
        exported = load_predictor(tmp_path / fmt / BANK_FILE, engine=fmt).predict(images)
        for ours, theirs in zip(reference, exported, strict=True):
            assert theirs.score == pytest.approx(ours.score, rel=1e-4), fmt
            np.testing.assert_allclose(theirs.map, ours.map, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.real_data
def test_real_bottle_served_over_http(real_bottle: TrainedRun) -> None:
    paths = [p for p in real_bottle.scores if "/good/" not in p][:2] + [
        p for p in real_bottle.scores if "/good/" in p
    ][:1]
    scores = serve_and_post("models:/bottle@champion", real_bottle.uri, paths)
    assert scores == pytest.approx([real_bottle.scores[p] for p in paths], rel=1e-5)
