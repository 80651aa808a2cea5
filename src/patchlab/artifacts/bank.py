"""The memory bank file: every member's bank, the run's config and its decisions, safetensors.

A bank fetched from a shared tracking server is untrusted. Its config is read as data (YAML,
no tags, no code) and only the classes the project's configs name may be built from it.
"""

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from patchlab.artifacts.run_files import written_atomically
from patchlab.artifacts.store import redact
from patchlab.errors import UserError

BANK_FILE = "memory_bank.safetensors"
# The bank between fit and the end of the run: kept if the run fails or is killed, under a
# name that no loader (and no user) takes for a finished model.
UNFINISHED_BANK_FILE = "memory_bank.unfinished.safetensors"
# What loading builds from a bank's config: exactly the `_target_`s of conf/backbone,
# conf/model and conf/search (a test keeps them equal). Anything else is refused unbuilt.
BUILT_GROUPS = ("backbone", "model", "search", "data.geometry")
ALLOWED_TARGETS = frozenset(
    {
        "patchlab.core.backbones.create_feature_extractor",
        "patchlab.core.backbones.create_ensemble",
        "patchlab.core.detector.PatchCore",
        "patchlab.core.search.ExactIndex",
        "patchlab.core.search.IVFIndex",
        "patchlab.data.geometry.CenterCrop",
        "patchlab.data.geometry.Resize",
        "patchlab.data.geometry.Fit",
    }
)
# A run's record of its finished bank: the banks' values (equal across launchers and
# machines) and the whole file (config and decisions too), checked by every loader.
DIGEST_TAGS = ("bank_file_sha256", "bank_sha256")
IGNORE_KEY = "ignore_mask"  # the (H, W) uint8 ignore mask, when the run had one


def bank_key(member: int) -> str:
    """The tensor name of member `member`'s bank: `memory_bank` for a single backbone."""
    return "memory_bank" if member == 0 else f"memory_bank.{member}"


def save_bank(
    banks: list[torch.Tensor],
    cfg: DictConfig,
    path: Path,
    extra: dict | None = None,
    statistics: list[tuple[float, float]] | None = None,
    ignore: torch.Tensor | None = None,
) -> None:
    """Writes every member's (M, D) bank plus the resolved config, so loading needs nothing
    but this file.

    Members after the first are `memory_bank.1`, `memory_bank.2`, ...; an ensemble's normal
    statistics (mean, std per member) go in the `statistics` metadata. `extra` holds JSON-able
    results that travel with the bank (the decisions: thresholds, post-processing); `ignore`
    is the run's ignore mask, which predict applies too.
    """
    data = OmegaConf.to_container(cfg.data, resolve=True)
    layers = cfg.backbone.get("layers")
    metadata = {
        "backbone": cfg.backbone.name,
        "layers": json.dumps(list(layers) if layers is not None else None),
        "feature_dim": str(banks[0].shape[1]),
        "bank_size": str(banks[0].shape[0]),
        "seed": str(cfg.seed),
        "preprocessing": json.dumps({k: data[k] for k in ("geometry", "mean", "std")}),
        "config": redact(OmegaConf.to_yaml(cfg, resolve=True)),  # no password from tracking.uri
        "extra": json.dumps(extra or {}),
    }
    if statistics:
        metadata["statistics"] = json.dumps(statistics)
    tensors = {bank_key(i): b.detach().cpu().contiguous() for i, b in enumerate(banks)}
    if ignore is not None:
        tensors[IGNORE_KEY] = ignore.to(torch.uint8).contiguous()
    with written_atomically(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)


def bank_digest(banks: list[torch.Tensor]) -> str:
    """sha256 of the banks' float32 values alone (not the file, whose metadata holds the
    config): equal digests mean bit-identical banks."""
    digest = hashlib.sha256()
    for bank in banks:
        digest.update(bank.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes: banks, config and decisions alike."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bank_digests(path: Path) -> dict[str, str]:
    """What a run records of its finished bank (DIGEST_TAGS), as tags and in its model."""
    return {"bank_file_sha256": file_digest(path), "bank_sha256": bank_digest(read_banks(path)[0])}


def verify_bank(path: Path, recorded: dict[str, str], origin: str) -> None:
    """Refuses a bank whose digests differ from those `origin` (its run, its model) recorded.

    Runs before anything is built from the file, the file's digest before its tensors are
    parsed; a record without digests (a run from before they were kept) checks nothing.
    """
    actual = {
        "bank_file_sha256": lambda: file_digest(path),
        "bank_sha256": lambda: bank_digest(read_banks(path)[0]),
    }
    for key in DIGEST_TAGS:
        value = recorded.get(key)
        found = actual[key]() if value else value
        if found != value:
            raise UserError(
                f"{path}: refused to load: its {key} is {found}, but {origin} recorded "
                f"{value}. The file was changed after the run wrote it."
            )


def read_banks(path: Path) -> tuple[list[torch.Tensor], list[tuple[float, float]], dict[str, str]]:
    """Every member's bank, the members' normal statistics (empty for one backbone), metadata."""
    with safe_open(str(path), framework="pt") as file:
        names = list(file.keys())  # a safetensors file is no dict: list its names
        count = sum(name.startswith(bank_key(0)) for name in names)
        banks = [file.get_tensor(bank_key(i)) for i in range(count)]
        metadata = file.metadata()
    statistics = [tuple(s) for s in json.loads(metadata.get("statistics", "[]"))]
    return banks, statistics, metadata


def read_ignore(path: Path) -> torch.Tensor | None:
    """The (H, W) bool ignore mask stored with the bank, if the run had one."""
    with safe_open(str(path), framework="pt") as file:
        names = list(file.keys())
        return file.get_tensor(IGNORE_KEY).bool() if IGNORE_KEY in names else None


def _targets(node: object, path: str) -> list[tuple[str, object]]:
    """Every `_target_` under `node`, with its dotted path."""
    if isinstance(node, dict):
        found = [(path, node["_target_"])] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{path}.{key}" if path else str(key))
        return found
    if isinstance(node, list):
        return [hit for i, value in enumerate(node) for hit in _targets(value, f"{path}[{i}]")]
    return []


def bank_config(path: Path, metadata: dict[str, str]) -> DictConfig:
    """The run's config from a bank's metadata, checked before anything is built from it.

    The YAML is parsed as data (no tags, no code); a `_target_` in what loading builds that is
    not in ALLOWED_TARGETS is refused with the key that holds it.
    """
    if "config" not in metadata:
        raise UserError(f"{path} has no 'config' metadata: not a patchlab memory bank")
    try:
        cfg = OmegaConf.create(metadata["config"])
    except Exception as error:
        raise UserError(f"{path}: its 'config' metadata is not valid YAML: {error}") from error
    for group in BUILT_GROUPS:
        node = OmegaConf.select(cfg, group)
        if node is None:
            raise UserError(f"{path}: its config has no '{group}' section")
        for where, target in _targets(OmegaConf.to_container(node), group):
            if target not in ALLOWED_TARGETS:
                raise UserError(
                    f"{path}: refused to load: {where}._target_ is {target!r}, and only "
                    f"{sorted(ALLOWED_TARGETS)} may be built from a bank file"
                )
    return cfg


def check_bank(path: Path, bank: torch.Tensor, metadata: dict[str, str], feature_dim: int) -> None:
    """A bank must be the shape its metadata says and the width its backbone produces."""
    if bank.ndim != 2:
        raise UserError(f"{path}: memory_bank has shape {tuple(bank.shape)}, expected (M, D)")
    for key, actual in (("bank_size", bank.shape[0]), ("feature_dim", bank.shape[1])):
        if key in metadata and metadata[key] != str(actual):
            raise UserError(
                f"{path}: memory_bank has {key} {actual}, metadata says {metadata[key]}"
            )
    if bank.shape[1] != feature_dim:
        raise UserError(
            f"{path}: memory_bank has {bank.shape[1]} features per patch, but backbone "
            f"{metadata.get('backbone')} with layers {metadata.get('layers')} makes {feature_dim}: "
            "the bank was built with another backbone, layers or embedding_dim"
        )
