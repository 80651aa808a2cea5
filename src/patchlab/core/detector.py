"""PatchCore as one pure-torch object: embed images, fit memory banks, score images. The test
pass, `predict`, the exported engines and the MLflow model all score through `PatchCore.predict`;
only the embedder (images -> patch embeddings) differs between them."""

import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import nn

from patchlab.core.backbones import BackboneEnsemble
from patchlab.core.coreset import CoresetSampler
from patchlab.core.ensemble import combine_grids, normal_statistics, standardised
from patchlab.core.features import FeatureExtractor
from patchlab.core.patches import Embedder, TorchEmbedder, flatten_patches, grid_validity
from patchlab.core.scoring import NearestNeighbourScorer, anomaly_maps
from patchlab.core.search import ExactIndex, SearchIndex
from patchlab.core.stoppable import Stop
from patchlab.core.tiles import Tiling
from patchlab.errors import check_limits

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class PatchCore(nn.Module):
    """Memory-bank anomaly detector: `fit` builds each member's bank, `predict` scores images.

    An ensemble gives each member its own bank, coreset and index; members' scores are
    standardised by their normal statistics and averaged.

    Args:
        backbone: Frozen feature extractor(s); None when an engine supplies the embeddings
            (set `embedder` before predicting).
        sampler: Chooses the bank from all training patches; only `fit` needs one.
        search: Makes one nearest-neighbour index per member (a class or a partial).
        num_neighbors: Bank neighbourhood size of the image-score reweighting.
        embedding_dim: Pool patch embeddings to this many channels (None keeps them all).
        feature_dtype: Storage of training patches before coreset selection.
        seed: Seeds the coreset's projection and first pick, and the ensemble statistics.
        tile_size, tile_overlap: Embed each input as overlapping square tiles of this many
            pixels (for high-resolution parts; see `core/tiles.py`); None: the whole input.
    """

    LIMITS: ClassVar = {  # a literal for the preflight
        "coreset_ratio": [(">", 0), ("<=", 1)],
        "num_neighbors": [(">=", 1)],
        "feature_dtype": [("in", ["float32", "float16"])],
        "tile_size": [(">", 0), ("multiple of", 32)],
        "tile_overlap": [(">=", 0), ("multiple of", 32), ("<", "tile_size")],
    }

    def __init__(
        self,
        backbone: FeatureExtractor | BackboneEnsemble | None,
        sampler: CoresetSampler | None = None,
        search: Callable[[], SearchIndex] = ExactIndex,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        patch_size: int = 3,
        embedding_dim: int | None = None,
        blur_sigma: float = 4.0,
        feature_dtype: str = "float32",
        forward_chunk: int = 8,
        seed: int = 0,
        tile_size: int | None = None,
        tile_overlap: int = 32,
    ) -> None:
        super().__init__()
        check_limits(self.LIMITS, locals())
        self.embedder: Embedder | None = None
        if backbone is not None:
            self.embedder = TorchEmbedder(backbone, patch_size, embedding_dim, forward_chunk)
        self.sampler, self.search = sampler, search
        self.coreset_ratio, self.num_neighbors = coreset_ratio, num_neighbors
        self.blur_sigma, self.seed = blur_sigma, seed
        self.feature_dtype = FEATURE_DTYPES[feature_dtype]
        self.tiling = Tiling(tile_size, tile_overlap) if tile_size is not None else None
        self.scorers: list[NearestNeighbourScorer] = []
        self.banks: list[torch.Tensor] = []
        self.statistics: list[tuple[float, float]] = []  # ensembles: each member's normal scale

    @property
    def is_ensemble(self) -> bool:
        return len(self.banks) > 1

    def bank_size(self, patches: int) -> int:
        """Rows kept from `patches` training patches."""
        return max(1, int(patches * self.coreset_ratio))

    def units(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The (H, W) pieces each input of `size` is embedded as: itself, or its tiles."""
        tiles = self.tiling and [(self.tiling.size,) * 2] * len(self.tiling.positions(*size))
        return tiles or [size]

    def check_bank_size(self, train_images: int, size: tuple[int, int]) -> None:
        """Fails before feature extraction when the search would need more bank than exists."""
        for stride in self.embedder.strides:
            cells = sum(math.ceil(h / stride) * math.ceil(w / stride) for h, w in self.units(size))
            patches = train_images * cells
            self._scorer().check_bank_size(self.bank_size(patches), patches)

    def _scorer(self) -> NearestNeighbourScorer:
        return NearestNeighbourScorer(self.num_neighbors, self.search())

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) images -> each member's (B, D, h, w) patch embeddings."""
        return self.embedder.embed(images)

    def training_patches(
        self, images: torch.Tensor, valid: torch.Tensor | None = None
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:
        """Each member's embeddings of the batch (tile by tile when tiling), with the pixel
        validity they cover: what `PatchCollector.add` takes."""
        pieces = self.tiling.crops(images, valid) if self.tiling else [(None, images, valid)]
        for _, piece, piece_valid in pieces:
            yield self.embed(piece), piece_valid

    def fit(self, features: list[torch.Tensor], stop: Stop | None = None) -> None:
        """Selects each member's bank from its (N, D) training patches and indexes it.

        Selection, bank and search run where the detector's parameters are (a GPU, after
        `.to("cuda")`). The list is emptied as it goes, so each member's patches are freed
        once its bank is chosen. `stop` is asked between steps of the selection (see
        `CoresetSampler.select`). An ensemble also measures each member's normal statistics.
        """
        generator = torch.Generator().manual_seed(self.seed)
        device = next(self.parameters(), torch.empty(0)).device
        ensemble = len(features) > 1
        banks, scorers, statistics = [], [], []
        while features:
            member = features.pop(0).to(device)
            selected = self.sampler.select(member, self.bank_size(len(member)), generator, stop)
            banks.append(member[selected].float())
            scorers.append(self._scorer())
            scorers[-1].fit(banks[-1])
            if ensemble:
                stats = normal_statistics(member, selected, scorers[-1].index, generator)
                statistics.append(stats)
        self.banks, self.scorers, self.statistics = banks, scorers, statistics

    def load(
        self, banks: list[torch.Tensor], statistics: list[tuple[float, float]] | None = None
    ) -> None:
        """Restores saved banks (and an ensemble's statistics) to score without refitting."""
        if len(banks) > 1 and (statistics is None or len(statistics) != len(banks)):
            raise ValueError("an ensemble's banks need each member's normal statistics")
        self.banks = [bank.float() for bank in banks]
        self.statistics = list(statistics or [])
        self.scorers = [self._scorer() for _ in banks]
        for scorer, bank in zip(self.scorers, self.banks, strict=True):
            scorer.fit(bank)

    @torch.inference_mode()
    def predict(
        self, images: torch.Tensor, sigma: float | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> (B,) image scores, (B, H, W) maps, (B, h, w) patch scores.

        Maps are blurred at `sigma`, by default `blur_sigma`. Pixels outside (B, H, W) bool
        `valid` (padding, ignored regions) are not scored: NaN in maps and patch scores, never
        an image's top patch. With tiling, tiles are scored one at a time, their grids averaged
        where they overlap, and the image score is the highest tile's.
        """
        if not self.banks:
            raise RuntimeError("The memory bank is empty: fit the detector or load a bank first")
        if valid is not None and bool(valid.all()):
            valid = None
        if self.tiling is None:
            image_score, grid = self._score(images, valid)
        else:
            image_score, grid = self.tiling.score(images, valid, self._score)
        scored = None if valid is None else ~torch.isnan(grid)
        sigma = self.blur_sigma if sigma is None else sigma
        maps = anomaly_maps(grid, tuple(images.shape[-2:]), sigma, scored)
        if valid is not None:
            maps = maps.masked_fill(~valid.to(maps.device), float("nan"))
        return image_score, maps, grid

    def _score(
        self, images: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) image scores and the (B, h, w) patch-score grid of the finest member."""
        grids, image_scores = [], []
        for member, (embedding, scorer) in enumerate(
            zip(self.embed(images), self.scorers, strict=True)
        ):
            batch, _, height, width = embedding.shape
            cells = None if valid is None else grid_validity(valid, (height, width)).flatten(1)
            patch_scores, scores = scorer.score(flatten_patches(embedding), cells)
            grid = patch_scores.reshape(batch, height, width)
            if self.is_ensemble:
                stats = self.statistics[member]
                grid, scores = standardised(grid, stats), standardised(scores, stats)
            grids.append(grid)
            image_scores.append(scores)
        grid = combine_grids(grids) if self.is_ensemble else grids[0]
        return torch.stack(image_scores).mean(0), grid
