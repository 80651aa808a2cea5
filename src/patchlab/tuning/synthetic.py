"""CutPaste anomalies with exact masks, for tuning when no labelled defects exist.

Held-back good images (never in the memory bank) each appear twice in the validation set:
as they are, and with a patch of themselves cut out and pasted elsewhere (Li et al., CVPR 2021).
"""

import math
from collections.abc import Callable

import torch

from patchlab.core.outputs import TestOutputs

# (B, 3, H, W) images, valid=(B, H, W) -> (B,) image scores, (B, H, W) maps, (B, h, w) grids
Predict = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def cut_paste(image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pastes a brightness-jittered rectangle of (3, H, W) `image` elsewhere; returns its mask."""
    _, height, width = image.shape
    area = float(torch.empty(1).uniform_(0.02, 0.08, generator=generator)) * height * width
    aspect = math.exp(
        float(torch.empty(1).uniform_(math.log(0.3), math.log(3.3), generator=generator))
    )
    h = max(2, min(height - 1, round(math.sqrt(area * aspect))))
    w = max(2, min(width - 1, round(math.sqrt(area / aspect))))
    sy, dy = torch.randint(0, height - h + 1, (2,), generator=generator).tolist()
    sx, dx = torch.randint(0, width - w + 1, (2,), generator=generator).tolist()
    gain = float(torch.empty(1).uniform_(0.7, 1.3, generator=generator))
    out = image.clone()
    out[:, dy : dy + h, dx : dx + w] = image[:, sy : sy + h, sx : sx + w] * gain
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[dy : dy + h, dx : dx + w] = 1
    return out, mask


def synthetic_validation(
    predict: Predict, images: torch.Tensor, valid: torch.Tensor, seed: int, batch_size: int = 16
) -> TestOutputs:
    """Scores (N, 3, H, W) held-back good images and their CutPaste copies with `predict`
    (a fitted detector's `predict`); (N, H, W) `valid` marks their scored pixels."""
    generator = torch.Generator().manual_seed(seed)
    pasted, masks = zip(*(cut_paste(image, generator) for image in images), strict=True)
    inputs, all_valid = torch.cat([images, torch.stack(pasted)]), torch.cat([valid, valid])
    zeros = torch.zeros(len(images), *images.shape[-2:], dtype=torch.uint8)
    all_masks = torch.cat([zeros, torch.stack(masks)]) * all_valid
    parts = [
        predict(chunk, valid=chunk_valid)
        for chunk, chunk_valid in zip(
            inputs.split(batch_size), all_valid.split(batch_size), strict=True
        )
    ]
    scores, maps, grids = (torch.cat(column) for column in zip(*parts, strict=True))
    labels = torch.cat([torch.zeros(len(images)), torch.ones(len(images))]).long()
    known = torch.ones(len(labels), dtype=torch.bool)  # every pasted pixel is known
    return TestOutputs(scores, labels, maps, all_masks, grids, known, all_valid)
