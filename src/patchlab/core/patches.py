"""Locally aware patch embeddings (PatchCore section 3.1)."""

import torch
import torch.nn.functional as F
from torch import nn

from patchlab.core.features import FeatureExtractor


def aggregate_patches(
    features: list[torch.Tensor], patch_size: int = 3, embedding_dim: int | None = None
) -> torch.Tensor:
    """Builds one embedding per position of the first (finest) layer's grid.

    Each layer is averaged over a `patch_size` neighbourhood so an embedding sees local
    context, deeper layers are bilinearly resized to the finest grid, and the layers are
    concatenated. `embedding_dim` optionally average-pools the channels to a fixed size, as
    the paper does to bound memory for wide backbones.

    Returns:
        (B, D, H, W) embeddings on the first layer's grid.
    """
    grid = features[0].shape[-2:]
    pooled = []
    for layer in features:
        layer = F.avg_pool2d(layer, patch_size, stride=1, padding=patch_size // 2)
        if layer.shape[-2:] != grid:
            layer = F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
        pooled.append(layer)
    embedding = torch.cat(pooled, dim=1)
    if embedding_dim is not None and embedding_dim < embedding.shape[1]:
        batch, channels, height, width = embedding.shape
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, channels)
        flat = F.adaptive_avg_pool1d(flat, embedding_dim)
        embedding = flat.reshape(batch, height, width, embedding_dim).permute(0, 3, 1, 2)
    return embedding


def flatten_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, H*W, D), row-major over the grid."""
    return embedding.flatten(2).transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Backbone plus patch aggregation as one module: (B, 3, H, W) -> (B, D, h, w).

    What training runs per image, packaged so that it can be exported as one graph; the
    memory bank and the search stay outside it.
    """

    def __init__(
        self, backbone: FeatureExtractor, patch_size: int = 3, embedding_dim: int | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.embedding_dim = embedding_dim

    @property
    def feature_dim(self) -> int:
        """D: what a memory bank built with this embedding must have per row."""
        channels = sum(self.backbone.channels)
        return min(channels, self.embedding_dim) if self.embedding_dim else channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return aggregate_patches(self.backbone(images), self.patch_size, self.embedding_dim)
