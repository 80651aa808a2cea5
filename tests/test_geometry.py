"""The whole image at any shape and size: geometries, tall parts, mixed sizes, tiles, ignore
regions, and the way back to each file's own pixels."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from helpers.configs import compose_config
from helpers.synthetic import make_shaped_category
from patchlab.artifacts.bank import BANK_FILE, bank_digest, read_banks
from patchlab.artifacts.run_files import OUTPUTS_FILE, SCORES_FILE, load_outputs
from patchlab.core.detector import PatchCore
from patchlab.core.metrics import evaluate_outputs
from patchlab.core.tiles import Stitched, Tiling
from patchlab.data.geometry import CenterCrop, Fit, Resize
from patchlab.data.mvtec import read_image
from patchlab.deploy.export import export
from patchlab.deploy.loading import load_predictor
from patchlab.errors import SettingError
from patchlab.jobs.pipeline import run

TALL = (1000, 400)  # (height, width): a tall part
ENDS = (0.0, 0.05, 0.2, 0.95)  # defects in the top 20% of the long axis
WHOLE_TALL = ["geometry=fit", "data.geometry.size=[160,64]"]  # the part's own aspect
FIT_SQUARE = ["geometry=fit", "data.geometry.size=[64,64]"]


def test_center_crop_is_torchvisions_resize_and_crop() -> None:
    image = torch.randint(0, 256, (3, 500, 1250), dtype=torch.uint8)
    crop = CenterCrop(256, 224)
    reference = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(image))
    assert torch.equal(crop.image(image), reference)
    place = crop.place((500, 1250))
    assert place.resized == (256, 640) and place.shift == (-16, -208)
    assert place.kept_share() == pytest.approx(224 * 224 / (256 * 640))
    assert bool(crop.valid((500, 1250)).all())  # a crop has no padding


def test_fit_keeps_the_aspect_and_marks_the_padding() -> None:
    fit = Fit([64, 160])
    place = fit.place(TALL)
    assert place.resized == (64, 26) and place.shift == (0, 67)
    image = fit.image(torch.full((3, *TALL), 200, dtype=torch.uint8))
    valid = fit.valid(TALL)
    assert int(valid.sum()) == 64 * 26 and bool((image[:, ~valid] == 0).all())
    assert bool((image[:, valid] == 200).all())
    with pytest.raises(SettingError, match="size"):
        Fit([64])


@pytest.mark.parametrize(
    ("geometry", "scored_rows"),
    [(CenterCrop(256, 224), (325, 675)), (Fit([160, 64]), None), (Resize([64, 64]), None)],
)
def test_maps_go_back_to_the_file_with_nan_only_where_nothing_was_scored(
    geometry, scored_rows
) -> None:
    size = geometry.size()
    ramp = torch.arange(size[0], dtype=torch.float32)[:, None].expand(size)
    back = geometry.to_source(ramp, TALL)
    assert back.shape == TALL
    finite_rows = (~torch.isnan(back)).any(1).nonzero().flatten()
    if scored_rows is None:
        assert not bool(torch.isnan(back).any())
    else:  # the crop saw the middle 350 rows of 1000: the ends are NaN, never filled
        top, bottom = scored_rows
        assert abs(int(finite_rows[0]) - top) <= 2 and abs(int(finite_rows[-1]) - bottom) <= 2
        assert bool(torch.isnan(back[:300]).all()) and bool(torch.isnan(back[700:]).all())
    inside = back[~torch.isnan(back)]
    assert float(inside.min()) >= 0 and float(inside.max()) <= size[0] - 1  # only real values


@pytest.fixture(scope="module")
def tall_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tall")
    make_shaped_category(root, "tall", [TALL], ENDS, train=6, good=3, defects=4, seed=3)
    return root


def tall_run(root: Path, out: Path, *overrides: str) -> dict[str, float]:
    config = compose_config([f"data.root={root}", "category.name=tall", *overrides])
    metrics, _, _ = run(config, out)
    return metrics


def test_the_whole_tall_part_finds_every_defect_where_the_seed_crop_does_not(
    tall_root: Path, tmp_path: Path, caplog
) -> None:
    with caplog.at_level(logging.WARNING):
        cropped = tall_run(tall_root, tmp_path / "crop")
    (warning,) = [r.message for r in caplog.records if "never scored" in r.message]
    assert "geometry=fit data.geometry.size=" in warning and "1000x400" in warning
    assert cropped["image_auroc"] < 0.9  # the defects lie outside the centre square

    whole = tall_run(tall_root, tmp_path / "whole", *WHOLE_TALL)
    assert whole["image_auroc"] == 1.0
    outputs = load_outputs(tmp_path / "whole" / OUTPUTS_FILE)
    for image in torch.nonzero(outputs.labels).flatten():
        peak = int(torch.argmax(outputs.maps[image]))
        assert outputs.masks[image].flatten()[peak] == 1  # the map's maximum is on the defect


def test_predict_maps_a_tall_part_in_its_own_pixels(tall_root: Path, tmp_path: Path) -> None:
    tall_run(tall_root, tmp_path, *WHOLE_TALL)
    predictor = load_predictor(tmp_path / BANK_FILE)
    for path in sorted((tall_root / "tall" / "test" / "blob").glob("*.png")):
        (prediction,) = predictor.predict([read_image(path)])
        truth = np.array(
            Image.open(tall_root / "tall" / "ground_truth" / "blob" / f"{path.stem}_mask.png")
        )
        assert prediction.map.shape == TALL and not np.isnan(prediction.map).any()
        peak = np.unravel_index(np.argmax(prediction.map), TALL)
        near = truth[max(peak[0] - 8, 0) : peak[0] + 8, max(peak[1] - 8, 0) : peak[1] + 8]
        assert near.any(), (path.name, peak)  # at the defect, in the file's coordinates
    export(tmp_path / BANK_FILE, "onnx", tmp_path / "onnx")  # a non-square graph
    image = read_image(path)
    (ours,) = predictor.predict([image])
    (theirs,) = load_predictor(tmp_path / "onnx" / BANK_FILE, engine="onnx").predict([image])
    assert theirs.score == pytest.approx(ours.score, rel=1e-4)


def test_mixed_sizes_train_test_and_predict_and_padding_counts_nowhere(tmp_path: Path) -> None:
    sizes = [(64, 64), (96, 64), (64, 128)]  # three sizes, three aspect ratios
    make_shaped_category(tmp_path / "data", "mixed", sizes, (0.2, 0.2, 0.8, 0.8), seed=5)
    config = compose_config([f"data.root={tmp_path / 'data'}", "category.name=mixed", *FIT_SQUARE])
    metrics, _, _ = run(config, tmp_path / "out")
    outputs = load_outputs(tmp_path / "out" / OUTPUTS_FILE)
    padding = ~outputs.valid
    assert bool(padding.any()) and bool(torch.isnan(outputs.maps[padding]).all())
    assert not bool(torch.isnan(outputs.maps[outputs.valid]).any())
    counts = evaluate_outputs(outputs).pixel["all"]
    assert counts.positives + counts.negatives == int(outputs.valid.sum())
    assert metrics["pixel_auroc"] == evaluate_outputs(outputs).metrics["pixel_auroc"]
    predictor = load_predictor(tmp_path / "out" / BANK_FILE)
    paths = sorted((tmp_path / "data" / "mixed" / "test").rglob("*.png"))
    images = [read_image(path) for path in paths]
    for image, prediction in zip(images, predictor.predict(images), strict=True):
        assert prediction.map.shape == tuple(image.shape[-2:])
        assert not np.isnan(prediction.map).any()  # fit scores every pixel of every file


def test_a_defect_inside_the_ignored_region_scores_as_normal(tmp_path: Path) -> None:
    corner = (0.0, 0.0, 0.35, 0.35)
    make_shaped_category(tmp_path / "data", "fixture", [(64, 64)], corner, seed=7)
    ignore = np.zeros((64, 64), np.uint8)
    ignore[: int(0.4 * 64), : int(0.4 * 64)] = 255
    Image.fromarray(ignore).save(tmp_path / "ignore.png")
    base = [f"data.root={tmp_path / 'data'}", "category.name=fixture"]
    seen, _, _ = run(compose_config(base), tmp_path / "seen")
    ignored, _, _ = run(
        compose_config([*base, f"data.ignore_mask={tmp_path / 'ignore.png'}"]), tmp_path / "ignored"
    )
    assert seen["image_auroc"] == 1.0 and ignored["image_auroc"] <= 0.75
    outputs = load_outputs(tmp_path / "ignored" / OUTPUTS_FILE)
    assert int(outputs.masks.sum()) == 0  # the defect pixels are in no pixel metric
    assert evaluate_outputs(outputs).pixel["all"].negatives == int(outputs.valid.sum())
    predictor = load_predictor(tmp_path / "ignored" / BANK_FILE)
    (prediction,) = predictor.predict([read_image(next((tmp_path / "data").rglob("blob/*.png")))])
    assert np.isnan(prediction.map[:20, :20]).all() and not np.isnan(prediction.map[40:, 40:]).any()


def test_tiles_cover_the_input_and_stitch_by_averaging() -> None:
    tiling = Tiling(64, 32)
    assert tiling.starts(160) == [0, 32, 64, 96] and tiling.starts(64) == [0]
    with pytest.raises(SettingError, match="multiple of 32"):
        tiling.starts(100)
    with pytest.raises(SettingError, match="tile_size must be > 0 and multiple of 32"):
        PatchCore(None, tile_size=48, tile_overlap=16)
    with pytest.raises(SettingError, match=r"tile_overlap must .* and < tile_size \(64\)"):
        PatchCore(None, tile_size=64, tile_overlap=64)
    stitched = Stitched(64, 64, 96)
    stitched.add((0, 0), torch.full((1, 8, 8), 1.0))
    stitched.add((0, 32), torch.full((1, 8, 8), 3.0))
    grid = stitched.grid()[0]
    assert grid.shape == (8, 12) and float(grid[0, 0]) == 1.0 and float(grid[0, 5]) == 2.0
    assert float(grid[0, 11]) == 3.0


def test_one_tile_as_large_as_the_input_is_the_untiled_run(synthetic_root, tmp_path) -> None:
    root = f"data.root={synthetic_root}"
    results = []
    for name, extra in (("whole", []), ("tiled", ["model.tile_size=64"])):
        metrics, detector, _ = run(compose_config([root, *extra]), tmp_path / name)
        scores = (tmp_path / name / SCORES_FILE).read_text()
        timing = {"fit_seconds", "test_seconds", "peak_rss_mb"}
        results.append(
            (
                bank_digest(detector.banks),
                scores,
                {k: v for k, v in metrics.items() if k not in timing},
            )
        )
    assert results[0] == results[1]
    whole, tiled = (load_outputs(tmp_path / n / OUTPUTS_FILE) for n in ("whole", "tiled"))
    assert torch.equal(whole.maps, tiled.maps) and torch.equal(
        whole.patch_scores, tiled.patch_scores
    )


def test_tiled_runs_predict_and_export_tile_by_tile(synthetic_root, tmp_path) -> None:
    tiled = ["geometry=resize", "data.geometry.size=[128,128]", "model.tile_size=64"]
    config = compose_config([f"data.root={synthetic_root}", *tiled])
    metrics, _, _ = run(config, tmp_path / "run")
    outputs = load_outputs(tmp_path / "run" / OUTPUTS_FILE)
    assert outputs.patch_scores.shape[-2:] == (16, 16)  # 3x3 tiles of 8x8 cells, stitched
    banks, _, metadata = read_banks(tmp_path / "run" / BANK_FILE)
    assert json.loads(metadata["preprocessing"])["geometry"]["size"] == [128, 128]
    assert metrics["bank_size"] == len(banks[0])
    export(tmp_path / "run" / BANK_FILE, "onnx", tmp_path / "onnx")
    paths = sorted((synthetic_root / "bottle" / "test").rglob("*.png"))
    images = [read_image(path) for path in paths]
    predictor = load_predictor(tmp_path / "run" / BANK_FILE)
    step = predictor.batch_size  # the run's batches: bit-identical scores
    reference = [
        p for i in range(0, len(images), step) for p in predictor.predict(images[i : i + step])
    ]
    exported = load_predictor(tmp_path / "onnx" / BANK_FILE, engine="onnx").predict(images)
    with (tmp_path / "run" / SCORES_FILE).open() as file:
        logged = {row["path"]: float(row["image_score"]) for row in csv.DictReader(file)}
    assert [ours.score for ours in reference] == [logged[str(p)] for p in paths]
    for ours, theirs in zip(reference, exported, strict=True):
        assert theirs.score == pytest.approx(ours.score, rel=1e-4)
