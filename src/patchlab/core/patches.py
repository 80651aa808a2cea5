"""Locally aware patch embeddings (PatchCore section 3.1): computed, per member, collected."""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from patchlab.core.backbones import BackboneEnsemble
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


def grid_validity(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel validity -> (B, h, w): a patch counts when most of its pixels do."""
    pooled = F.interpolate(valid[:, None].float(), size=grid, mode="area")[:, 0]
    return pooled >= 0.5


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


class Embedder(Protocol):
    """(B, 3, H, W) images -> one (B, D_i, h_i, w_i) patch-embedding grid per member."""

    feature_dims: list[int]

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]: ...


class TorchEmbedder(nn.Module):
    """Each member's backbone and patch aggregation; `forward` is what export traces.

    Args:
        forward_chunk: Images per backbone forward in `embed`. Bounds activation memory (a
            32-image forward of EfficientNet-Lite2 at 224 px holds ~430 MB); results do not
            change.
    """

    def __init__(
        self,
        backbone: FeatureExtractor | BackboneEnsemble,
        patch_size: int = 3,
        embedding_dim: int | None = None,
        forward_chunk: int = 8,
    ) -> None:
        super().__init__()
        extractors = list(backbone) if isinstance(backbone, BackboneEnsemble) else [backbone]
        self.members = nn.ModuleList(
            PatchEmbedding(extractor, patch_size, embedding_dim) for extractor in extractors
        )
        self.forward_chunk = forward_chunk

    @property
    def feature_dims(self) -> list[int]:
        return [member.feature_dim for member in self.members]

    @property
    def strides(self) -> list[int]:
        """Each member's finest stride: the patch grid is the image size divided by it."""
        return [member.backbone.strides[0] for member in self.members]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(member(images) for member in self.members)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        chunks = images.contiguous(memory_format=torch.channels_last).split(self.forward_chunk)
        return [torch.cat([member(chunk) for chunk in chunks]) for member in self.members]


class PatchCollector:
    """Every member's training patches, in (N, D) buffers allocated at the first batch.

    Args:
        units: Images (times tiles per image) that will be added; sizes the buffers.
    """

    def __init__(self, units: int, dtype: torch.dtype = torch.float32) -> None:
        self.units, self.dtype = units, dtype
        self.buffers: list[torch.Tensor] = []
        self.filled: list[int] = []

    def add(self, embeddings: list[torch.Tensor], valid: torch.Tensor | None = None) -> None:
        """Appends one batch: each member's (B, D, h, w) embeddings; with (B, H, W) pixel
        `valid`, only the patches of valid pixels (padding and ignored regions stay out)."""
        for member, embedding in enumerate(embeddings):
            patches = flatten_patches(embedding)
            per_unit = patches.shape[1]
            patches = patches.reshape(-1, patches.shape[-1])
            if valid is not None:
                patches = patches[grid_validity(valid, embedding.shape[-2:]).flatten()]
            if len(self.buffers) == member:
                total = self.units * per_unit
                self.buffers.append(torch.empty(total, patches.shape[1], dtype=self.dtype))
                self.filled.append(0)
            start = self.filled[member]
            self.buffers[member][start : start + len(patches)] = patches
            self.filled[member] += len(patches)

    def features(self) -> list[torch.Tensor]:
        return [buffer[:filled] for buffer, filled in zip(self.buffers, self.filled, strict=True)]
