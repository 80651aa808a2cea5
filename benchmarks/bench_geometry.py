"""Geometry and tiles: what keeping the whole image, or its pixels, costs and finds.

    python benchmarks/bench_geometry.py --highres   # 2048x2048 parts, 12-px defects: tiles or not
    python benchmarks/bench_geometry.py --bottle    # bottle: presets, whole image, tiles

Every row is one `train.py` run in its own process (so its peak RSS is its own), on real
bottle (`../shared/data/mvtec_ad`) or on parts this script generates. Prints one table; it
asserts nothing.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad"
COMMON = ["backbone=efficientnet_lite2", "tracking=none", "+trainer.enable_progress_bar=false"]


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, striped surface with a little noise: the same part every time, never identical."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.2 * np.sin(xs / 23.0 + phase) * np.cos(ys / 37.0)
    noisy = stripes + rng.normal(0, 0.015, stripes.shape).astype(np.float32)
    return (np.clip(np.stack([noisy, noisy * 0.9, noisy * 0.8], -1), 0, 1) * 255).astype(np.uint8)


def highres_category(root: Path, size: int = 2048, defect: int = 12, seed: int = 0) -> None:
    """train 10, test 10 good and 10 with one dark `defect`-pixel square each, with masks."""
    rng = np.random.default_rng(seed)
    part = root / "wafer"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (part / folder).mkdir(parents=True, exist_ok=True)
    for i in range(10):
        Image.fromarray(texture(rng, size)).save(part / "train" / "good" / f"{i:03d}.png")
        Image.fromarray(texture(rng, size)).save(part / "test" / "good" / f"{i:03d}.png")
        image, mask = texture(rng, size), np.zeros((size, size), np.uint8)
        y, x = rng.integers(defect, size - 2 * defect, size=2)
        image[y : y + defect, x : x + defect] = (40, 30, 30)
        mask[y : y + defect, x : x + defect] = 255
        Image.fromarray(image).save(part / "test" / "spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(part / "ground_truth" / "spot" / f"{i:03d}_mask.png")


def patches_per_image(size: list[int], tile: int | None, overlap: int = 32) -> int:
    """Stride-8 patches a run embeds per image: the whole input, or every tile."""
    if tile is None:
        return math.ceil(size[0] / 8) * math.ceil(size[1] / 8)
    per_side = [len(range(0, s - tile, tile - overlap)) + 1 for s in size]
    return per_side[0] * per_side[1] * (tile // 8) ** 2


def train(data_root: Path, category: str, overrides: list[str], out: Path) -> dict[str, float]:
    command = [sys.executable, str(ROOT / "train.py"), f"data.root={data_root}"]
    command += [f"category.name={category}", f"hydra.run.dir={out}", *COMMON, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{result.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def table(rows: list[tuple[str, list[str], list[int], int | None]], root: Path, category: str):
    print(
        "| setting | patches / image | image AUROC | pixel AUROC | fit | test | peak RSS |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for number, (name, overrides, size, tile) in enumerate(rows):
            m = train(root, category, overrides, Path(tmp) / str(number))
            print(
                f"| {name} | {patches_per_image(size, tile):,} | {m['image_auroc']:.4f} | "
                f"{m.get('pixel_auroc', float('nan')):.4f} | {m['fit_seconds']:.0f} s | "
                f"{m['test_seconds']:.0f} s | {m['peak_rss_mb']:.0f} MB |",
                flush=True,
            )


def highres() -> None:
    resize = ["geometry=resize", "data.geometry.size=[256,256]", "model.coreset_ratio=0.1"]
    tiled = ["geometry=resize", "data.geometry.size=[1024,1024]", "model.tile_size=256"]
    tiled += ["data.batch_size=4", "model.coreset_ratio=0.02"]
    with tempfile.TemporaryDirectory() as tmp:
        highres_category(Path(tmp))
        print("2048x2048 generated parts, 12-px defects, Lite2 blocks.2/4:")
        rows = [
            ("whole image resized to 256x256", resize, [256, 256], None),
            (
                "resized to 1024x1024, 256-px tiles, overlap 32, coreset 2%",
                tiled,
                [1024, 1024],
                256,
            ),
        ]
        table(rows, Path(tmp), "wafer")


def bottle() -> None:
    rows = [
        ("`geometry=seed` (crop 256/224)", [], [224, 224], None),
        ("`geometry=fine` (crop 336/336)", ["geometry=fine"], [336, 336], None),
        (
            "`geometry=resize` [288, 352] (whole image, not square)",
            ["geometry=resize", "data.geometry.size=[288,352]"],
            [288, 352],
            None,
        ),
        (
            "`geometry=resize` [448, 448], 224-px tiles, overlap 32",
            ["geometry=resize", "data.geometry.size=[448,448]", "model.tile_size=224"],
            [448, 448],
            224,
        ),
    ]
    print("bottle, Lite2 blocks.2/4, coreset 10%:")
    table(rows, BOTTLE, "bottle")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--highres", action="store_true")
    parser.add_argument("--bottle", action="store_true")
    args = parser.parse_args()
    if args.highres:
        highres()
    if args.bottle:
        bottle()


if __name__ == "__main__":
    main()
