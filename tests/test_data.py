"""Bad data fails early and names what is wrong; odd but valid data still loads."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.configs import compose_config
from helpers.synthetic import make_category, make_folder_layout
from patchlab.data.geometry import CenterCrop
from patchlab.errors import UserError, message
from patchlab.jobs.pipeline import run
from patchlab.training.datamodule import FolderDataModule, MVTecDataModule


@pytest.fixture
def category(tmp_path: Path) -> Path:
    return make_category(tmp_path, "part", size=48, train=3, good=2, defects=2)


def setup(root: Path, name: str = "part", **kwargs) -> MVTecDataModule:
    datamodule = MVTecDataModule(
        str(root), name, geometry=CenterCrop(48, 32), num_workers=0, **kwargs
    )
    datamodule.setup()
    return datamodule


def test_samples_masks_and_transforms(category: Path) -> None:
    datamodule = setup(category.parent)
    assert len(datamodule.train_samples) == 3 and len(datamodule.test_samples) == 6
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape == (6, 3, 32, 32) and batch["mask"].shape == (6, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0, 1}
    assert batch["label"].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch["mask"][:2].sum() == 0 and all(m.sum() > 0 for m in batch["mask"][2:])


def test_grayscale_and_odd_sizes_are_converted(tmp_path: Path) -> None:
    category = make_category(tmp_path, "gray", size=40, train=2, good=1, defects=1)
    for path in category.glob("train/good/*.png"):
        Image.open(path).convert("L").resize((60, 40)).save(path)
    image = MVTecDataModule(str(tmp_path), "gray", geometry=CenterCrop(48, 32), num_workers=0)
    image.setup()
    assert next(iter(image.train_dataloader()))["image"].shape == (2, 3, 32, 32)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*mvtec_anomaly_detection"):
        setup(tmp_path / "nowhere")


def test_missing_category_lists_what_is_there(category: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"holds \['part'\]"):
        setup(category.parent, "bottle")


def test_empty_train_folder(category: Path) -> None:
    for path in (category / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"No training images.*train/good"):
        setup(category.parent)


def test_defect_image_without_mask(category: Path) -> None:
    (category / "ground_truth" / "stain" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"stain/001.png has no mask"):
        setup(category.parent)


def test_mask_without_image(category: Path) -> None:
    (category / "test" / "scratch" / "000.png").unlink()
    with pytest.raises(ValueError, match=r"Masks without a test image.*\['000'\]"):
        setup(category.parent)


def test_mask_size_differs_from_image(category: Path) -> None:
    mask = category / "ground_truth" / "scratch" / "000_mask.png"
    Image.open(mask).resize((20, 20)).save(mask)
    with pytest.raises(ValueError, match=r"000_mask.png is \(20, 20\) but its image"):
        setup(category.parent)


def test_corrupt_image_is_named(category: Path) -> None:
    (category / "test" / "good" / "001.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"Unreadable or corrupt image file .*good/001.png"):
        setup(category.parent)


def test_the_scan_reads_headers_not_pixels(category: Path, monkeypatch) -> None:
    """Decoding happens once, in the loader; the scan reads sizes from the headers."""
    decoded = []
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda image: decoded.append(image))
    setup(category.parent)
    assert decoded == []


def test_a_truncated_training_image_stops_the_run_naming_it(cfg, tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_category(root, "part", seed=2)
    image = root / "part" / "train" / "good" / "003.png"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    config = compose_config([f"data.root={root}", "category.name=part", "data.num_workers=2"])
    with pytest.raises(UserError) as raised:
        run(config, tmp_path / "out")
    assert message(raised.value).startswith("Unreadable or corrupt image file")
    assert "003.png" in message(raised.value) and "\n" not in message(raised.value)


def test_crop_larger_than_resize_is_rejected(category: Path) -> None:
    with pytest.raises(ValueError, match="crop_size"):
        CenterCrop(resize=32, crop_size=48)


def test_good_only_test_set_loads(category: Path) -> None:
    for defect_type in ("scratch", "stain"):
        shutil.rmtree(category / "test" / defect_type)
        shutil.rmtree(category / "ground_truth" / defect_type)
    datamodule = setup(category.parent)
    assert all(s.label == 0 for s in datamodule.test_samples)
    assert torch.is_tensor(next(iter(datamodule.test_dataloader()))["image"])


def test_no_ground_truth_folder_is_image_only(category: Path, caplog) -> None:
    shutil.rmtree(category / "ground_truth")
    with caplog.at_level(logging.INFO):
        datamodule = setup(category.parent)
    assert not datamodule.pixel_labelled
    assert [s.mask for s in datamodule.test_samples] == [None] * 6
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["mask_known"].tolist() == [True, True, False, False, False, False]
    assert batch["mask"].sum() == 0 and batch["label"].tolist() == [0, 0, 1, 1, 1, 1]
    (line,) = [r.message for r in caplog.records if "image-only" in r.message]
    assert "no ground_truth/ folder" in line and "pixel metrics skipped" in line


def test_a_defect_type_missing_from_ground_truth_is_an_error(category: Path) -> None:
    shutil.rmtree(category / "ground_truth" / "stain")
    with pytest.raises(ValueError, match=r"stain/000.png has no mask"):
        setup(category.parent)


def folder(root: Path, **kwargs) -> FolderDataModule:
    datamodule = FolderDataModule(str(root), geometry=CenterCrop(48, 32), num_workers=0, **kwargs)
    datamodule.setup()
    return datamodule


def test_folder_layout_splits_normal_images_seeded(tmp_path: Path) -> None:
    root = make_folder_layout(tmp_path / "part", normal=10, abnormal=4)
    datamodule = folder(root, normal_split=0.3)
    goods = [s for s in datamodule.test_samples if s.label == 0]
    assert len(datamodule.train_samples) == 7 and len(goods) == 3
    assert {s.image for s in goods}.isdisjoint(s.image for s in datamodule.train_samples)
    assert [s.defect_type for s in datamodule.test_samples[3:]] == ["abnormal"] * 4
    assert not datamodule.pixel_labelled and datamodule.name == "part"
    again = folder(root, normal_split=0.3)
    other = folder(root, normal_split=0.3, split_seed=1)
    assert again.test_samples == datamodule.test_samples != other.test_samples


def test_folder_layout_with_masks_and_a_normal_test_folder(tmp_path: Path) -> None:
    root = make_folder_layout(tmp_path / "part", normal=6, abnormal=3, masks=True)
    (root / "good" / "n005.png").rename(root / "n005.png")
    (root / "test_good").mkdir()
    (root / "n005.png").rename(root / "test_good" / "n005.png")
    (root / "masks" / "d001.png").rename(root / "masks" / "d001_mask.png")
    datamodule = folder(root, mask_dir="masks", normal_test_dir="test_good")
    assert len(datamodule.train_samples) == 5 and len(datamodule.test_samples) == 4
    assert datamodule.pixel_labelled
    assert [s.mask.name for s in datamodule.test_samples[1:]] == [
        "d000.png",
        "d001_mask.png",
        "d002.png",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normal_split": 0.0}, r"normal_split=0.0 of 10 normal images leaves no test"),
        ({"normal_split": 1.0}, r"normal_split=1.0 of 10"),
        ({"abnormal_dir": "bad"}, r"No abnormal images \(data.abnormal_dir\): .*part/bad"),
        ({"normal_test_dir": "none"}, r"No normal test images"),
        ({"mask_dir": "nowhere"}, r"d000.png has no mask"),
    ],
)
def test_folder_layout_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = make_folder_layout(tmp_path / "part", normal=10, abnormal=2)
    with pytest.raises(ValueError, match=message):
        folder(root, **kwargs)
