"""MVTec download: checksum-verified extraction, and a clear message when it cannot download."""

import hashlib
import tarfile
from pathlib import Path

import pytest

from helpers.configs import compose_config
from helpers.synthetic import make_category
from patchlab.data.download import download_mvtec
from patchlab.errors import UserError
from patchlab.jobs.pipeline import run


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    """A small .tar.xz in MVTec's layout, and its SHA-256."""
    make_category(tmp_path / "src", "bottle", size=16, train=2, good=1, defects=1)
    path = tmp_path / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        tar.add(tmp_path / "src" / "bottle", arcname="bottle")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_checks_the_sum_and_extracts(archive, tmp_path: Path) -> None:
    path, digest = archive
    root = tmp_path / "data"
    download_mvtec(root, url=path.as_uri(), sha256=digest)
    assert len(list((root / "bottle" / "train" / "good").glob("*.png"))) == 2


def test_checksum_mismatch_is_an_error(archive, tmp_path: Path) -> None:
    path, _ = archive
    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        download_mvtec(tmp_path / "data", url=path.as_uri(), sha256="0" * 64)


def test_offline_download_says_where_to_put_the_data(tmp_path: Path) -> None:
    offline = r"Could not download MVTec AD.*extract it so that.*efficientnet_lite2 data.root="
    with pytest.raises(RuntimeError, match=offline):
        download_mvtec(tmp_path / "data", url="http://127.0.0.1:9/mvtec_anomaly_detection.tar.xz")
    assert not (tmp_path / "data").exists()  # what it created is gone: the next run says so
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError, match=offline):
        download_mvtec(kept, url="http://127.0.0.1:9/mvtec_anomaly_detection.tar.xz")
    assert kept.is_dir() and not list(kept.iterdir())  # a folder the user made stays, empty


def test_an_empty_data_root_says_how_to_fill_it(tmp_path: Path) -> None:
    (tmp_path / "mvtec_ad").mkdir()
    config = compose_config([f"data.root={tmp_path / 'mvtec_ad'}", "category=bottle"])
    with pytest.raises(
        UserError, match=r"is empty \(no category folders\)\. Download .*data.download=true"
    ):
        run(config, tmp_path / "run")
