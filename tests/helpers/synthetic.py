"""Small MVTec-layout categories: smooth textures with drawn defects and exact masks."""

from pathlib import Path

import numpy as np
from PIL import Image

MVTEC_CATEGORIES = [
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
]


def texture(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """A striped, slightly noisy RGB texture: every good image looks alike, never identical."""
    height, width = (size, size) if isinstance(size, int) else size
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.25 * np.sin(xs / 3.0 + phase) * np.cos(ys / 5.0)
    base = np.stack([stripes, stripes * 0.8 + 0.1, 0.6 - stripes * 0.3], axis=-1)
    noisy = base + rng.normal(0, 0.02, base.shape)
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def defect(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paints a bright square blob at a random place; returns the image and its 0/255 mask."""
    size = image.shape[0]
    side = max(4, size // 5)
    y, x = rng.integers(side, size - 2 * side, size=2)
    mask = np.zeros((size, size), np.uint8)
    mask[y : y + side, x : x + side] = 255
    out = image.copy()
    out[mask > 0] = rng.integers(0, 255, size=3)
    return out, mask


def make_category(
    root: Path,
    name: str,
    size: int = 64,
    train: int = 8,
    good: int = 3,
    defects: int = 3,
    seed: int = 0,
) -> Path:
    """Writes one category in MVTec layout with `defects` images of each of two defect types."""
    rng = np.random.default_rng(seed)
    category = root / name
    (category / "train" / "good").mkdir(parents=True)
    (category / "test" / "good").mkdir(parents=True)
    for i in range(train):
        Image.fromarray(texture(rng, size)).save(category / "train" / "good" / f"{i:03d}.png")
    for i in range(good):
        Image.fromarray(texture(rng, size)).save(category / "test" / "good" / f"{i:03d}.png")
    for defect_type in ("scratch", "stain"):
        (category / "test" / defect_type).mkdir(parents=True)
        (category / "ground_truth" / defect_type).mkdir(parents=True)
        for i in range(defects):
            image, mask = defect(rng, texture(rng, size))
            Image.fromarray(image).save(category / "test" / defect_type / f"{i:03d}.png")
            Image.fromarray(mask).save(
                category / "ground_truth" / defect_type / f"{i:03d}_mask.png"
            )
    return category


def make_folder_layout(
    root: Path, normal: int = 10, abnormal: int = 4, masks: bool = False, seed: int = 0
) -> Path:
    """Writes `good/`, `defect/` and, with `masks`, `masks/<stem>.png`: a team's own part."""
    rng = np.random.default_rng(seed)
    for folder in ("good", "defect", *(["masks"] if masks else [])):
        (root / folder).mkdir(parents=True)
    for i in range(normal):
        Image.fromarray(texture(rng, 64)).save(root / "good" / f"n{i:03d}.png")
    for i in range(abnormal):
        image, mask = defect(rng, texture(rng, 64))
        Image.fromarray(image).save(root / "defect" / f"d{i:03d}.png")
        if masks:
            Image.fromarray(mask).save(root / "masks" / f"d{i:03d}.png")
    return root


def make_shaped_category(
    root: Path,
    name: str,
    sizes: list[tuple[int, int]],
    defect_box: tuple[float, float, float, float],
    train: int = 8,
    good: int = 3,
    defects: int = 4,
    seed: int = 0,
) -> Path:
    """A category of (height, width) `sizes`, used in turn; each defect is a bright square
    placed inside `defect_box` = (top, left, bottom, right) as fractions of the image."""
    rng = np.random.default_rng(seed)
    category = root / name
    folders = ("train/good", "test/good", "test/blob", "ground_truth/blob")
    for folder in folders:
        (category / folder).mkdir(parents=True)
    for i in range(train):
        image = texture(rng, sizes[i % len(sizes)])
        Image.fromarray(image).save(category / "train" / "good" / f"{i:03d}.png")
    for i in range(good):
        image = texture(rng, sizes[(i + 1) % len(sizes)])
        Image.fromarray(image).save(category / "test" / "good" / f"{i:03d}.png")
    for i in range(defects):
        height, width = sizes[i % len(sizes)]
        image, mask = texture(rng, (height, width)), np.zeros((height, width), np.uint8)
        side = max(6, min(height, width) // 6)
        top, left, bottom, right = defect_box
        y = int(
            rng.integers(int(top * height), max(int(bottom * height) - side, int(top * height) + 1))
        )
        x = int(
            rng.integers(int(left * width), max(int(right * width) - side, int(left * width) + 1))
        )
        image[y : y + side, x : x + side] = (255, 255, 255)
        mask[y : y + side, x : x + side] = 255
        Image.fromarray(image).save(category / "test" / "blob" / f"{i:03d}.png")
        Image.fromarray(mask).save(category / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return category
