"""What every image goes through before the model: its geometry, the normalisation, and the
regions the user asked to ignore. Training, testing and predict share one of these."""

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from patchlab.data.geometry import Geometry, Size

MASK_LEVEL = 128  # a mask pixel is a defect (or ignored) when at least half-way to white


class Preprocessing:
    """A geometry, ImageNet-style normalisation, and an optional ignore mask.

    Args:
        geometry: Where each image's pixels go in the model input.
        mean, std: Per-channel normalisation of the [0, 1] image.
        ignore: (H, W) bool, True where pixels are ignored (clamps, text, fixture edges). It is
            stretched to each image's own size, so it works for any image size; ignored pixels
            never enter the bank, the scores, the maps or the metrics.
    """

    def __init__(
        self,
        geometry: Geometry,
        mean: Sequence[float],
        std: Sequence[float],
        ignore: torch.Tensor | None = None,
    ) -> None:
        self.geometry = geometry
        self.mean, self.std = list(mean), list(std)
        self.ignore = ignore
        self._normalise = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        )
        self._valid: dict[Size, torch.Tensor] = {}

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H0, W0) uint8 -> (3, H, W) normalised float.

        Pixels that are not valid (padding, ignored regions) are set to the normalised mean,
        0: what they held must not reach the backbone, whose receptive fields would carry it
        into the scored patches around them.
        """
        normalised = self._normalise(self.geometry.image(image))
        valid = self.valid(tuple(image.shape[-2:]))
        return normalised if bool(valid.all()) else normalised * valid

    def display(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H0, W0) uint8 -> (3, H, W) uint8, as the model sees it (for figures)."""
        return self.geometry.image(image)

    def valid(self, source: Size) -> torch.Tensor:
        """(H, W) bool: the input pixels that show the image and are not ignored."""
        if source not in self._valid:
            valid = self.geometry.valid(source)
            if self.ignore is not None:
                stretched = v2.functional.resize(
                    self.ignore[None].to(torch.uint8), list(source), v2.InterpolationMode.NEAREST
                )
                valid &= self.geometry.mask(stretched)[0] == 0
            self._valid[source] = valid
        return self._valid[source]

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(1, H0, W0) uint8 ground truth -> (H, W) uint8 {0, 1}, 0 where not valid: a defect
        in an ignored region is not a pixel any metric counts."""
        defect = self.geometry.mask(mask)[0] >= MASK_LEVEL
        return (defect & self.valid(tuple(mask.shape[-2:]))).to(torch.uint8)
