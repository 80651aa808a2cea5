"""A trained model in use: predict, safe loading, exported graphs, the MLflow model and serving."""

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from helpers.configs import ROOT, tracked
from helpers.mlflow_server import model_server
from patchlab.artifacts.bank import BANK_FILE, bank_config, read_banks, save_bank
from patchlab.artifacts.run_files import load_outputs
from patchlab.artifacts.store import tracking_uri_set
from patchlab.data.mvtec import read_image
from patchlab.deploy.export import export
from patchlab.deploy.loading import load_predictor, predictor_from
from patchlab.deploy.predict import main as predict_main
from patchlab.errors import UserError
from patchlab.jobs.retune import retune
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at
from patchlab.tuning.study import ThresholdTuning

MODEL = "synthetic_bottle"


class TrainedRun:
    """A finished, tracked run: its folder, store URI, run id and test images."""

    def __init__(self, out: Path, store: Path, category: Path) -> None:
        self.out, self.category = out, category  # scores.csv keeps the paths as given
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


@contextmanager
def changed_in_the_store(trained: TrainedRun, name: str, change) -> Iterator[Path]:
    """The logged model's `name` file in the artifact store changed by `change(bytes)`, and
    restored afterwards (the module's tests share the store)."""
    (path,) = [p for p in (trained.out.parent / "mlruns").rglob(name) if "models" in p.parts]
    original = path.read_bytes()
    path.write_bytes(change(original))
    try:
        yield path
    finally:
        path.write_bytes(original)


def one_byte_changed(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])  # the last byte: bank values, not the header


def load_served_model(uri: str, tracking_uri: str):
    with tracking_uri_set(tracking_uri):
        return mlflow.pyfunc.load_model(uri)


@pytest.mark.parametrize("source", ["run id", f"models:/{MODEL}@champion"])
def test_a_bank_changed_by_one_byte_is_refused(trained: TrainedRun, tmp_path, source) -> None:
    source = trained.run_id if source == "run id" else source
    args = [source, str(trained.category / "test"), "--out", str(tmp_path / "p")]
    with changed_in_the_store(trained, BANK_FILE, one_byte_changed):
        with pytest.raises(UserError) as refused:
            predictor_from(source, tracking_uri=trained.uri)
        with pytest.raises(UserError, match="bank_file_sha256"):
            load_served_model(f"models:/{MODEL}@champion", trained.uri)
        with pytest.raises(SystemExit):
            predict_main([*args, "--tracking-uri", trained.uri])
    tags = MlflowClient(trained.uri).get_run(trained.run_id).data.tags
    assert tags["bank_file_sha256"] in str(refused.value)  # both digests named
    assert "refused to load: its bank_file_sha256 is " in str(refused.value)
    assert not (tmp_path / "p").exists()
    predictor_from(source, tracking_uri=trained.uri)  # the restored bank loads


def test_an_entry_file_with_one_added_line_is_refused(trained: TrainedRun) -> None:
    added = b"print('hello from the artifact store')\n"
    with changed_in_the_store(trained, "pyfunc_entry.py", lambda data: data + added):
        with pytest.raises(UserError, match="entry file is not the one this patchlab ships"):
            load_served_model(f"models:/{MODEL}@champion", trained.uri)
        with pytest.raises(UserError, match="entry file"):
            predictor_from(f"models:/{MODEL}@champion", tracking_uri=trained.uri)


def test_a_served_batch_answers_each_row(trained: TrainedRun, tmp_path: Path) -> None:
    paths = list(trained.scores)[:3]
    posted = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
    large = tmp_path / "large.png"
    Image.new("L", (10_000, 6_000)).save(large)  # 60 MP: over MAX_PIXELS
    corrupt = base64.b64encode(b"\x89PNG not really").decode()
    frame = pd.DataFrame(
        {
            "image": [posted[0], corrupt, posted[1], None, "not base64!", posted[2], None],
            "path": [None, None, None, str(large), None, None, str(tmp_path / "missing.png")],
        }
    )
    answer = load_served_model(f"models:/{MODEL}@champion", trained.uri).predict(frame)
    good = [0, 2, 5]
    assert answer.image_score[good].tolist() == pytest.approx([trained.scores[p] for p in paths])
    assert answer.error[good].isna().all()
    assert answer.operating_point[good].tolist() == ["f1"] * 3  # threshold=optuna's default
    errors = answer.error.tolist()
    assert "posted image" in errors[1] and "over the limit of 50000000" in errors[3]
    assert "not base64" in errors[4] and "no image file at path" in errors[6]
    assert answer.image_score[[1, 3, 4, 6]].isna().all()
    text = answer.to_json()
    assert "Traceback" not in text and str(ROOT) not in text


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


def encoded(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def serve_and_post(model_uri: str, tracking_uri: str, images: list[str]) -> tuple[list, bytes]:
    """Posts base64-encoded images as one batch; returns the answer's rows and its body."""
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
    with model_server(model_uri, tracking_uri) as url:
        request = urllib.request.Request(
            f"{url}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
    return json.loads(raw)["predictions"], raw


@pytest.mark.slow
def test_mlflow_models_serve_answers_posted_images(trained: TrainedRun) -> None:
    """Three good images and a corrupt one: three results and one error row, no trace."""
    paths = list(trained.scores)[-3:]
    images = [encoded(paths[0]), encoded(paths[1]), base64.b64encode(b"GIF89a?").decode()]
    rows, body = serve_and_post(
        f"models:/{MODEL}@champion", trained.uri, [*images, encoded(paths[2])]
    )
    good = [rows[0], rows[1], rows[3]]
    expected = [trained.scores[p] for p in paths]
    assert [row["image_score"] for row in good] == pytest.approx(expected, rel=1e-5)
    assert all(row.get("error") is None for row in good)
    assert "Unreadable or corrupt image file posted image" in rows[2]["error"]
    assert rows[2]["image_score"] is None
    for leak in (b"Traceback", b"site-packages", str(ROOT).encode()):
        assert leak not in body


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
    rows, _ = serve_and_post(
        "models:/bottle@champion", real_bottle.uri, [encoded(p) for p in paths]
    )
    expected = [real_bottle.scores[p] for p in paths]
    assert [row["image_score"] for row in rows] == pytest.approx(expected, rel=1e-5)


@pytest.mark.real_data
def test_a_false_reject_target_on_real_bottle(real_bottle: TrainedRun, tmp_path: Path) -> None:
    """Re-chosen on the run's cached bottle scores: the threshold rejects at most 5% of good
    validation images, and the held-out rates come with their Clopper-Pearson intervals."""
    folder = tmp_path / "retune"
    shutil.copytree(real_bottle.out, folder)
    point = {"objective": "false_reject", "target": 0.05}
    tuning = ThresholdTuning(seed=0, n_trials=3, operating_point=point)
    found = retune(folder, tuning, OmegaConf.load(folder / "config.yaml"), real_bottle.run_id)
    assert found.rates["val"]["false_reject_rate"].value <= 0.05
    held = found.rates["held_out"]["recall"]
    assert found.metrics["held_out_image_recall_ci_low"] == pytest.approx(held.interval()[0])
    assert f"held-out recall {held.value:.3f} (95% CI" in "\n".join(found.lines())
