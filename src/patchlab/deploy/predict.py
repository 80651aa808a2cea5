"""Score new images with a trained model; no labels needed.

    patchlab predict SOURCE INPUT... --out DIR [--engine torch|onnx|openvino]

SOURCE: an MLflow run id, a runs:/ or models:/name@alias URI, a run folder, an export folder
(from patchlab export) or a memory_bank.safetensors file. INPUT: image files,
folders (searched recursively) or globs. Writes DIR/predictions.csv, DIR/maps/<name>.png
(16-bit, 32768 = the pixel decision threshold), DIR/masks/<name>.png (0/255) at each input's
own size, and with --overlays DIR/overlays/<name>.png. Images stream through in batches, so
memory does not grow with their number. Unreadable files are reported in the CSV and the log,
the rest go on, and the exit status is 1 if any failed.
"""

import argparse
import csv
import glob
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from patchlab.artifacts.store import given_tracking_uri
from patchlab.data.mvtec import IMAGE_SUFFIXES, read_image
from patchlab.deploy.engines import ENGINES
from patchlab.deploy.loading import predictor_from
from patchlab.deploy.predictor import Prediction, Predictor
from patchlab.errors import UserError, command_parser, exit_on_user_error

log = logging.getLogger("patchlab.predict")
PREDICTIONS_FILE = "predictions.csv"
COLUMNS = [
    "path",
    "image_score",
    "normalised_score",
    "anomalous",
    "operating_point",
    "defect_area_px",
    "error",
]


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (recursive) and globs -> image files, each once, in the order given.

    Paths stay as the user gave them (relative, through symlinks): the CSV names the file the
    user knows. The same file given twice is listed once."""
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"INPUT {item!r} is no file, no folder with images, no glob match")
        found |= {os.path.abspath(p): p for p in matches if os.path.abspath(p) not in found}
    return list(found.values())


def output_names(paths: list[Path]) -> list[Path]:
    """Each input's path below the inputs' common folder, so same-named files do not collide."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    return [p.relative_to(common).with_suffix(".png") for p in absolute]


def batches(paths: list[Path], size: int) -> Iterator[list[tuple[int, torch.Tensor | str]]]:
    """Decoded images `size` at a time; an unreadable file yields its error message instead."""
    for start in range(0, len(paths), size):
        batch: list[tuple[int, torch.Tensor | str]] = []
        for index in range(start, min(start + size, len(paths))):
            try:
                batch.append((index, read_image(paths[index])))
            except ValueError as error:
                batch.append((index, str(error)))
        yield batch


def overlay(image: torch.Tensor, prediction: Prediction) -> Image.Image:
    """The image with the map in red, the predicted mask's outline in yellow, and what was not
    scored (outside a crop, padding, ignored regions) greyed out."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    heat = np.clip(np.nan_to_num(prediction.map, nan=0.0), 0, 1)[..., None]
    blended = rgb * (1 - 0.5 * heat) + np.array([255, 0, 0], np.float32) * 0.5 * heat
    unscored = np.isnan(prediction.map)
    blended[unscored] = 0.35 * blended[unscored] + 0.65 * 128
    if prediction.mask is not None:
        edge = prediction.mask & ~ndimage.binary_erosion(prediction.mask, iterations=2)
        blended[edge] = (255, 255, 0)
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


def write_images(
    out: Path, name: Path, image: torch.Tensor, prediction: Prediction, overlays: bool
) -> None:
    def target(folder: str) -> Path:
        path = out / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    Image.fromarray(prediction.map_16bit()).save(target("maps"))
    if prediction.mask is not None:
        Image.fromarray(prediction.mask.astype(np.uint8) * 255).save(target("masks"))
    if overlays:
        overlay(image, prediction).save(target("overlays"))


def predict_folder(
    predictor: Predictor, paths: list[Path], out: Path, batch_size: int, overlays: bool
) -> int:
    """Writes predictions.csv and the per-image PNGs; returns how many images failed."""
    out.mkdir(parents=True, exist_ok=True)
    names, point = output_names(paths), predictor.decisions.operating_point
    failed = 0
    start = time.perf_counter()
    with (out / PREDICTIONS_FILE).open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        progress = tqdm(total=len(paths), unit="img", desc="predict")
        for batch in batches(paths, batch_size):
            good = [(i, image) for i, image in batch if isinstance(image, torch.Tensor)]
            predictions = (
                dict(
                    zip(
                        [i for i, _ in good], predictor.predict([im for _, im in good]), strict=True
                    )
                )
                if good
                else {}
            )
            for index, image in batch:
                if isinstance(image, str):
                    failed += 1
                    log.error("%s", image)
                    writer.writerow([str(paths[index]), "", "", "", point, "", image])
                    continue
                result = predictions[index]
                area = "" if result.defect_area is None else result.defect_area
                writer.writerow(
                    [
                        str(paths[index]),
                        result.score,
                        result.normalised_score,
                        int(result.anomalous),
                        point,
                        area,
                        "",
                    ]
                )
                write_images(out, names[index], image, result, overlays)
            file.flush()
            progress.update(len(batch))
        progress.close()
    seconds = time.perf_counter() - start
    print(f"{len(paths)} images in {seconds:.1f} s: {len(paths) / seconds:.1f} images/s")
    return failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("predict", __doc__)
    parser.add_argument("source")
    parser.add_argument("inputs", nargs="+", metavar="INPUT")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--engine", default="torch", choices=list(ENGINES))
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the run's data.batch_size"
    )
    parser.add_argument("--overlays", action="store_true", help="also write overlay PNGs")
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    parser.add_argument("--weights", default=None, help="override the backbone's weights source")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = expand_inputs(args.inputs)
    uri = given_tracking_uri(args.tracking_uri)
    predictor = predictor_from(args.source, args.engine, uri, args.weights)
    if "test set" in predictor.decisions.thresholds_from:
        log.warning(
            "decisions use thresholds picked on the run's test set (%s); train with "
            "threshold=optuna for thresholds tuned on validation data",
            predictor.decisions.thresholds_from,
        )
    batch_size = args.batch_size or predictor.batch_size
    failed = predict_folder(predictor, paths, args.out, batch_size, args.overlays)
    if failed:
        log.error("%d of %d images could not be read; see %s", failed, len(paths), PREDICTIONS_FILE)
        sys.exit(1)


if __name__ == "__main__":
    main()
