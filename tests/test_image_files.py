"""Hostile and odd image files: each is read as documented or refused with its file name."""

import io
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchlab.data.geometry import CenterCrop
from patchlab.data.mvtec import MVTecDataset, Sample, image_size, read_image
from patchlab.data.preprocessing import MASK_LEVEL, Preprocessing

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
sizes = st.tuples(st.integers(1, 48), st.integers(1, 48))


def saved(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


def pixels(seed: int, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)


def refused(path: Path) -> None:
    """Decoding names the file; the header-only scan either names it too or lets it through
    to the decode (a truncated file's header is intact)."""
    with pytest.raises(ValueError, match=re.escape(path.name)):
        read_image(path)
    try:
        image_size(path)
    except ValueError as error:
        assert path.name in str(error)


@SETTINGS
@given(
    size=sizes,
    seed=st.integers(0, 999),
    suffix=st.sampled_from([".png", ".jpg"]),
    cut=st.floats(0.1, 0.9),
)
def test_truncated_files_are_refused_by_name(tmp_path, size, seed, suffix, cut) -> None:
    whole = io.BytesIO()
    Image.fromarray(pixels(seed, (size[0] + 16, size[1] + 16))).save(
        whole, suffix[1:].replace("jpg", "jpeg")
    )
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(whole.getvalue()[: int(len(whole.getvalue()) * cut)])
    refused(path)


def test_an_empty_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    refused(path)


@SETTINGS
@given(size=sizes, seed=st.integers(0, 999))
def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path, size, seed) -> None:
    values = np.random.default_rng(seed).integers(0, 65536, (size[1], size[0]), dtype=np.uint16)
    path = saved(Image.fromarray(values), tmp_path / "gray16.png")
    image = read_image(path)
    assert image.shape == (3, size[1], size[0])
    expected = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(image[0].numpy(), expected)


@SETTINGS
@given(size=sizes, seed=st.integers(0, 999), mode=st.sampled_from(["P", "CMYK", "RGBA", "L", "1"]))
def test_other_modes_become_rgb(tmp_path, size, seed, mode) -> None:
    source = Image.fromarray(pixels(seed, size, 4), "RGBA")
    image = source.convert(mode) if mode != "RGBA" else source
    path = saved(image, tmp_path / ("image.tif" if mode == "CMYK" else "image.png"))
    decoded = read_image(path)
    assert decoded.shape == (3, size[1], size[0]) and decoded.dtype.is_floating_point is False
    if mode == "RGBA":  # alpha is dropped, colour kept
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), np.asarray(source)[..., :3])


@SETTINGS
@given(size=sizes, seed=st.integers(0, 999), orientation=st.integers(1, 8))
def test_exif_orientation_is_applied(tmp_path, size, seed, orientation) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(Image.fromarray(pixels(seed, size)), tmp_path / "phone.jpg", exif=exif)
    turned = orientation in (5, 6, 7, 8)
    upright = (size[1], size[0]) if turned else size
    assert image_size(path) == upright
    assert tuple(read_image(path).shape[1:]) == (upright[1], upright[0])


def test_a_one_pixel_image_goes_through_the_transform(tmp_path: Path) -> None:
    path = saved(Image.new("RGB", (1, 1), (200, 10, 10)), tmp_path / "dot.png")
    image = Preprocessing(CenterCrop(64, 56), [0.5] * 3, [0.5] * 3).image(read_image(path))
    assert image.shape == (3, 56, 56)


def test_a_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch) -> None:
    path = saved(Image.new("L", (200, 200)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40,000 pixels > 2 x the limit
    with pytest.raises(ValueError, match=r"Refused image file .*bomb\.png"):
        read_image(path)
    with pytest.raises(ValueError, match=r"bomb\.png"):
        image_size(path)


@SETTINGS
@given(size=st.tuples(st.integers(2, 32), st.integers(2, 32)), seed=st.integers(0, 999))
def test_mask_values_other_than_0_and_255_split_at_half_way(tmp_path, size, seed) -> None:
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    image = saved(Image.fromarray(pixels(seed, size)), tmp_path / "000.png")
    mask = saved(Image.fromarray(values), tmp_path / "000_mask.png")
    crop = min(size)
    dataset = MVTecDataset(
        [Sample(image, "crack", mask)], Preprocessing(CenterCrop(crop, crop), [0.5] * 3, [0.5] * 3)
    )
    got = dataset[0]["mask"].numpy()
    assert set(np.unique(got)) <= {0, 1}
    top, left = round((size[1] - crop) / 2.0), round((size[0] - crop) / 2.0)
    expected = values[top : top + crop, left : left + crop] >= MASK_LEVEL
    assert np.array_equal(got.astype(bool), expected)
