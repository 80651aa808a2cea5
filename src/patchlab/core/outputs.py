"""What a test pass produces, image by image: the one record metrics, figures and tuning read."""

from dataclasses import dataclass, fields

import torch


@dataclass
class TestOutputs:
    """Everything the test pass produced, in dataset order, for metrics, figures and tuning."""

    image_scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    maps: torch.Tensor  # (N, H, W) anomaly maps at input resolution; NaN where not scored
    masks: torch.Tensor  # (N, H, W) uint8 ground truth; zeros where not `mask_known` or `valid`
    patch_scores: torch.Tensor  # (N, h, w) before upsampling and blur: what tuning re-blurs
    mask_known: torch.Tensor  # (N,) bool: pixels labelled (goods always, defects with a mask)
    valid: torch.Tensor  # (N, H, W) bool: pixels scored (not padding, not ignored)

    __test__ = False  # a data class, not a pytest test class

    @property
    def pixel_labelled(self) -> bool:
        """Whether pixel metrics can be computed: False in image-only mode."""
        return bool(self.mask_known.all())

    def subset(self, index: torch.Tensor) -> "TestOutputs":
        """The images at `index`, e.g. a validation split."""
        return TestOutputs(**{f.name: getattr(self, f.name)[index] for f in fields(self)})
