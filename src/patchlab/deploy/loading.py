"""From what a user names (run id, runs:/ or models:/ URI, run or export folder, bank file) to a
ready Predictor, treating everything fetched as untrusted: safetensors and YAML only, no
pickle, only allow-listed classes built (see `artifacts.bank.bank_config`), and a fetched bank
checked against the digests its run recorded."""

import json
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from patchlab.artifacts.bank import (
    BANK_FILE,
    bank_config,
    check_bank,
    read_banks,
    read_ignore,
)
from patchlab.artifacts.store import tracking_uri_set
from patchlab.core.detector import PatchCore
from patchlab.data.geometry import geometry_from
from patchlab.data.preprocessing import Preprocessing
from patchlab.deploy.engines import EMBEDDERS, ENGINES
from patchlab.deploy.predictor import Decisions, Predictor
from patchlab.deploy.provenance import RUN_ID, verify_fetched
from patchlab.errors import UserError

MODEL_NAME = "model"  # the logged model's name within its run


def bank_in(folder: Path) -> Path:
    """The bank file in a run folder, an export folder or a downloaded MLflow model."""
    found = sorted(folder.rglob(BANK_FILE), key=lambda p: len(p.parts))
    if not found:
        raise UserError(f"{folder} holds no {BANK_FILE}: not a run, export or model folder")
    return found[0]


def _download(uri: str, tracking_uri: str | None, into: Path) -> Path:
    import mlflow

    # models:/ URIs are resolved through the registry, which follows the global URI, not
    # download_artifacts' tracking_uri argument.
    with tracking_uri_set(tracking_uri or mlflow.get_tracking_uri()):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))


def fetch_source(source: str, tracking_uri: str | None, into: Path) -> Path:
    """The local bank file that `source` names, downloading from MLflow when it is remote.

    A run's bank lives in its logged model (the run holds no second copy); a run whose
    model could not be logged keeps the bank as a run artifact, which is looked for next.
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        return bank_in(path)
    uris = [source]
    if RUN_ID.match(source):
        uris = [f"runs:/{source}/{MODEL_NAME}", f"runs:/{source}/{BANK_FILE}"]
    elif not source.startswith(("runs:/", "models:/")):
        raise UserError(
            f"SOURCE {source!r} is not an existing file or folder, an MLflow run id, or a "
            "runs:/ or models:/ URI"
        )
    errors = []
    for uri in uris:
        try:
            local = _download(uri, tracking_uri, into)
        except Exception as error:
            errors.append(f"{uri}: {error}")
            continue
        bank = local if local.is_file() else bank_in(local)
        verify_fetched(source, bank, tracking_uri)
        return bank
    raise UserError(f"Could not fetch {source} from {tracking_uri}: {'; '.join(errors)}")


def detector_from_config(cfg: DictConfig, engine: str = "torch") -> PatchCore:
    """The run's detector without its bank; for a graph engine, without its torch backbone."""
    torch.manual_seed(cfg.seed)  # as in training, so even a random-init backbone comes back equal
    backbone = instantiate(cfg.backbone) if engine == "torch" else None
    search = instantiate(cfg.search, _partial_=True)
    return instantiate(cfg.model, backbone=backbone, search=search)


def input_unit(detector: PatchCore, cfg: DictConfig) -> tuple[int, int]:
    """The (H, W) images the embedder sees: the geometry's input, or a tile of it."""
    geometry = geometry_from(OmegaConf.to_container(cfg.data.geometry, resolve=True))
    return detector.units(geometry.size())[0]


def load_detector(
    bank_path: Path, engine: str = "torch", weights: str | None = None
) -> tuple[PatchCore, DictConfig, dict[str, str]]:
    """The fitted detector of a bank file, its checked config and the file's metadata.

    `weights` overrides a single backbone's weights source. ONNX / OpenVINO graphs are looked
    for beside the bank.
    """
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {list(ENGINES)}, got {engine!r}")
    banks, statistics, metadata = read_banks(bank_path)
    cfg = bank_config(bank_path, metadata)
    if weights is not None:
        if "members" in cfg.backbone:
            raise UserError(
                f"{bank_path} holds an ensemble: give each member's weights in its config"
            )
        cfg.backbone.weights = weights
    detector = detector_from_config(cfg, engine)
    if engine != "torch":
        detector.embedder = EMBEDDERS[engine](bank_path.parent, input_unit(detector, cfg))
    dims = detector.embedder.feature_dims
    if len(banks) != len(dims):
        raise UserError(f"{bank_path}: {len(banks)} banks, but its backbone has {len(dims)}")
    for member, (bank, dim) in enumerate(zip(banks, dims, strict=True)):
        check_bank(bank_path, bank, metadata if member == 0 else {}, dim)
    detector.load(banks, statistics)
    return detector, cfg, metadata


def load_predictor(bank_path: Path, engine: str = "torch", weights: str | None = None) -> Predictor:
    """A Predictor from a bank file: its detector, preprocessing and decisions."""
    detector, cfg, metadata = load_detector(bank_path, engine, weights)
    extra = json.loads(metadata.get("extra") or "{}")
    if extra.get("image_threshold") is None:
        raise UserError(f"{bank_path} stores no decision threshold: train it again to get one")
    stored = json.loads(metadata["preprocessing"])
    geometry = geometry_from(stored["geometry"])
    preprocessing = Preprocessing(geometry, stored["mean"], stored["std"], read_ignore(bank_path))
    batch_size = int(OmegaConf.select(cfg, "data.batch_size", default=16))
    return Predictor(detector, preprocessing, Decisions.from_extra(extra), batch_size)


def predictor_from(
    source: str, engine: str = "torch", tracking_uri: str | None = None, weights: str | None = None
) -> Predictor:
    """`fetch_source` then `load_predictor`; downloads go to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_predictor(fetch_source(source, tracking_uri, Path(tmp)), engine, weights)
