"""Intermediate feature maps of a timm model, stopping the forward at the deepest one needed."""

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from patchlab.errors import SettingError


class _DeepestLayerReached(Exception):
    """Raised from a forward hook so that layers past the deepest requested one never run."""


class FeatureExtractor(nn.Module):
    """Returns the outputs of named layers of a timm model, in network order.

    Layer names are the `module` entries of timm's `feature_info` (e.g. `blocks.2`, `layer3`),
    so the valid names and their channel counts come from timm rather than a table kept here.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        info = {entry["module"]: entry for entry in getattr(model, "feature_info", [])}
        if not layers:
            raise SettingError("{layers} is empty; name at least one feature layer.")
        unknown = [name for name in layers if name not in info]
        if unknown:
            raise SettingError(
                f"Unknown feature layer(s) {unknown} in {{layers}} for backbone "
                f"{getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)}; "
                f"valid names: {list(info)}"
            )
        order = list(info)
        self.layers = sorted(dict.fromkeys(layers), key=order.index)
        self.channels = [int(info[name]["num_chs"]) for name in self.layers]
        self.strides = [int(info[name]["reduction"]) for name in self.layers]
        self.model = model.eval().requires_grad_(False)
        # Graph export traces the whole forward, and a trace cannot pass an exception: export
        # turns this off, and the exporter drops the layers past the deepest as dead code.
        self.stop_early = True
        self._outputs: dict[str, torch.Tensor] = {}
        for name in self.layers:
            model.get_submodule(name).register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        deepest = name == self.layers[-1]

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._outputs[name] = output
            if deepest and self.stop_early:
                raise _DeepestLayerReached

        return hook

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stays in eval mode: batch-norm statistics belong to the pretrained backbone."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Maps (B, 3, H, W) images to one (B, C_i, H/s_i, W/s_i) tensor per requested layer."""
        self._outputs.clear()
        with contextlib.suppress(_DeepestLayerReached):
            self.model(images)
        outputs = [self._outputs[name] for name in self.layers]
        self._outputs.clear()
        return outputs
