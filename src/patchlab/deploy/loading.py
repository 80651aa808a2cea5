"""From what a user names (run id, runs:/ or models:/ URI, run or export folder, bank file) to a
ready Predictor, treating everything fetched as untrusted: safetensors and YAML only, no
pickle, and only allow-listed classes built (see `outputs.bank_config`)."""

import json
import re
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from patchlab.deploy.engines import ENGINES
from patchlab.deploy.predictor import Decisions, Predictor
from patchlab.errors import UserError
from patchlab.outputs import BANK_FILE, bank_config, check_bank, read_bank

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def deployable_config(bank_path: Path, metadata: dict[str, str]) -> DictConfig:
    """The checked config of a single-backbone bank; an ensemble's is refused by name."""
    cfg = bank_config(bank_path, metadata)
    if "members" in cfg.backbone:
        raise UserError(
            f"{bank_path} holds an ensemble ({cfg.backbone.name}): predict, export and the "
            "MLflow model take one backbone; evaluate an ensemble with train.py"
        )
    return cfg


def bank_in(folder: Path) -> Path:
    """The bank file in a run folder, an export folder or a downloaded MLflow model."""
    found = sorted(folder.rglob(BANK_FILE), key=lambda p: len(p.parts))
    if not found:
        raise UserError(f"{folder} holds no {BANK_FILE}: not a run, export or model folder")
    return found[0]


def fetch_source(source: str, tracking_uri: str | None, into: Path) -> Path:
    """The local bank file that `source` names, downloading from MLflow when it is remote."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        return bank_in(path)
    if RUN_ID.match(source):
        source = f"runs:/{source}/{BANK_FILE}"
    if not source.startswith(("runs:/", "models:/")):
        raise UserError(
            f"SOURCE {source!r} is not an existing file or folder, an MLflow run id, or a "
            "runs:/ or models:/ URI"
        )
    import mlflow

    from patchlab.tracking.runs import tracking_uri_set

    try:
        # models:/ URIs are resolved through the registry, which follows the global URI,
        # not download_artifacts' tracking_uri argument.
        with tracking_uri_set(tracking_uri or mlflow.get_tracking_uri()):
            local = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into))
            )
    except Exception as error:
        raise UserError(f"Could not fetch {source} from {tracking_uri}: {error}") from error
    return local if local.is_file() else bank_in(local)


def load_predictor(bank_path: Path, engine: str = "torch", weights: str | None = None) -> Predictor:
    """A Predictor from a bank file; ONNX / OpenVINO graphs are looked for beside it."""
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {sorted(ENGINES)}, got {engine!r}")
    bank, metadata = read_bank(bank_path)
    cfg = deployable_config(bank_path, metadata)
    embed, feature_dim = ENGINES[engine](bank_path.parent, cfg, weights)
    check_bank(bank_path, bank, metadata, feature_dim)
    extra = json.loads(metadata.get("extra") or "{}")
    if extra.get("image_threshold") is None:
        raise UserError(
            f"{bank_path} stores no decision threshold: it was written before runs stored "
            "them; train it again to get one"
        )
    preprocessing = json.loads(metadata["preprocessing"])
    model, decisions = OmegaConf.to_container(cfg.model), Decisions.from_extra(extra)
    batch_size = int(cfg.data.get("batch_size", 16))
    return Predictor(embed, bank, model, preprocessing, decisions, batch_size)


def predictor_from(
    source: str, engine: str = "torch", tracking_uri: str | None = None, weights: str | None = None
) -> Predictor:
    """`fetch_source` then `load_predictor`; downloads go to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_predictor(fetch_source(source, tracking_uri, Path(tmp)), engine, weights)
