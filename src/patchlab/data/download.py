"""Fetches MVTec AD from MVTec's official download, checked against its SHA-256."""

import hashlib
import tarfile
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
    "420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MANUAL_STEPS = (
    "Download mvtec_anomaly_detection.tar.xz (about 4.9 GB) from "
    "https://www.mvtec.com/company/research/datasets/mvtec-ad and extract it so that "
    "{root}/<category>/train/good exists, or point data.root at an existing copy. Offline "
    "(no hub either): python train.py backbone=efficientnet_lite2 data.root=/path/to/mvtec_ad."
)


def download_mvtec(root: Path, url: str = MVTEC_URL, sha256: str = MVTEC_SHA256) -> None:
    """Downloads and extracts the archive into `root`, keeping nothing half-written: a failed
    download removes the partial file and a `root` it created, so the next run's message is
    the missing-folder one, with its hints."""
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "mvtec_anomaly_detection.tar.xz"
    partial = archive.with_suffix(".xz.part")
    if not archive.is_file():
        try:
            _fetch(url, partial)
        except OSError as error:
            partial.unlink(missing_ok=True)
            if created and not any(root.iterdir()):
                root.rmdir()
            raise RuntimeError(
                f"Could not download MVTec AD from {url} ({error}). "
                + MANUAL_STEPS.format(root=root)
            ) from error
        partial.rename(archive)
    digest = _sha256(archive)
    if digest != sha256:
        raise RuntimeError(f"Checksum mismatch for {archive}: sha256 {digest}, expected {sha256}")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def _fetch(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=30) as response, target.open("wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc="MVTec AD") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
