"""PatchCore as a LightningModule: one pass collects patches, the epoch end builds the bank."""

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from torch import nn

from patchlab.core.coreset import SAMPLERS, CoresetSampler
from patchlab.core.ensemble import combine_grids, normal_statistics, standardised
from patchlab.core.features import FeatureExtractor
from patchlab.core.patches import PatchEmbedding, flatten_patches
from patchlab.core.registry import build
from patchlab.core.scoring import NearestNeighbourScorer, anomaly_maps
from patchlab.core.search import SEARCH_INDEXES, SearchIndex
from patchlab.errors import SettingError
from patchlab.outputs import TestOutputs
from patchlab.training.backbones import BackboneEnsemble

# Both are PatchCore by design, not mistakes: it has no optimizer, and its backbone stays frozen
# in eval mode. A user seeing them would go looking for a bug that is not there. The last is
# Lightning's own use of a torch API it has not caught up with; nothing a user can change.
EXPECTED_WARNINGS = (
    r".*configure_optimizers.*returned `None`",
    r".*module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)

_FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@contextmanager
def expected_warnings_silenced() -> Iterator[None]:
    """Around `trainer.fit` and `trainer.test` only: other code keeps every warning."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


class PatchCore(pl.LightningModule):
    """Memory-bank anomaly detector; trains no weights, so there is no optimizer or loss.

    Args:
        backbone: Frozen feature extractor, or an ensemble of them: each member then gets its
            own bank, coreset and index, and their standardised scores are averaged.
        coreset_ratio: Fraction of training patches kept in the memory bank.
        num_neighbors: Bank neighbourhood size of the image-score reweighting.
        projection_dim: Random-projection size used only to pick the coreset.
        coreset_dtype: Precision of the coreset distance pass ("float32", "float16", "bfloat16").
        embedding_dim: Pool patch embeddings to this many channels (None keeps them all).
        patch_size: Neighbourhood averaged into each patch embedding.
        blur_sigma: Gaussian sigma (pixels) applied to the upsampled anomaly map.
        feature_dtype: Storage of training patches before coreset selection.
        seed: Seeds the projection and the coreset's first pick.
        forward_chunk: Images per backbone forward. Bounds activation memory (a 32-image
            forward of EfficientNet-Lite2 at 224 px holds ~430 MB); results do not change.
        search: Test-time nearest-neighbour search: a name in SEARCH_INDEXES ("exact", or
            "ivf": approximate, faster), built from the settings it names, or an index object.
        ivf_lists: Cells of the "ivf" index; None picks 2 sqrt(bank size).
        ivf_probes: Cells the "ivf" search visits per patch.
        sampler: How the bank is chosen: a name in SAMPLERS, built from the settings it names
            (coreset_ratio, projection_dim, coreset_dtype), or a sampler object.
    """

    def __init__(
        self,
        backbone: FeatureExtractor | BackboneEnsemble,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        projection_dim: int | None = 128,
        coreset_dtype: str = "float32",
        embedding_dim: int | None = None,
        patch_size: int = 3,
        blur_sigma: float = 4.0,
        feature_dtype: str = "float32",
        seed: int = 0,
        forward_chunk: int = 8,
        search: str | SearchIndex = "exact",
        ivf_lists: int | None = None,
        ivf_probes: int = 8,
        sampler: str | CoresetSampler = "greedy_coreset",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        extractors = list(backbone) if isinstance(backbone, BackboneEnsemble) else [backbone]
        if isinstance(sampler, str):
            sampler = build(
                SAMPLERS,
                sampler,
                "sampler",
                coreset_ratio=coreset_ratio,
                projection_dim=projection_dim,
                coreset_dtype=coreset_dtype,
            )
        self.sampler = sampler
        self.embeddings = nn.ModuleList(
            PatchEmbedding(extractor, patch_size, embedding_dim) for extractor in extractors
        )
        self.scorers = []
        for _ in extractors:  # one index per member: each indexes its own bank
            index = search
            if isinstance(search, str):
                index = build(
                    SEARCH_INDEXES, search, "search", ivf_lists=ivf_lists, ivf_probes=ivf_probes
                )
            elif self.scorers:
                index = copy.deepcopy(search)
            self.scorers.append(NearestNeighbourScorer(num_neighbors, index))
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        self.blur_sigma = blur_sigma
        if feature_dtype not in _FEATURE_DTYPES:
            raise SettingError(
                f"{{feature_dtype}} must be one of {list(_FEATURE_DTYPES)}, got {feature_dtype!r}"
            )
        self.feature_dtype = _FEATURE_DTYPES[feature_dtype]
        self.seed = seed
        self.forward_chunk = forward_chunk
        self.banks: list[torch.Tensor] = []
        self.statistics: list[tuple[float, float]] = []  # ensembles: each member's normal scale
        self._features: list[torch.Tensor] = []
        self._filled = [0] * len(extractors)
        self._test_batches: list[tuple[torch.Tensor, ...]] = []
        self.outputs: TestOutputs | None = None

    @property
    def is_ensemble(self) -> bool:
        return len(self.embeddings) > 1

    def check_bank_size(self, train_images: int, image_size: int) -> None:
        """Fails before feature extraction when the search would need more bank than exists."""
        for embedding, scorer in zip(self.embeddings, self.scorers, strict=True):
            grid = image_size // embedding.backbone.strides[0]
            patches = train_images * grid * grid
            scorer.check_bank_size(self.sampler.bank_size(patches), patches)

    @property
    def feature_dims(self) -> list[int]:
        """Each member's patch width: what its bank must have per row."""
        return [embedding.feature_dim for embedding in self.embeddings]

    def configure_optimizers(self) -> None:
        """PatchCore fits no parameters."""

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, member: int = 0) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D, h, w) locally aggregated patch embeddings."""
        chunks = images.contiguous(memory_format=torch.channels_last).split(self.forward_chunk)
        return torch.cat([self.embeddings[member](chunk) for chunk in chunks])

    def training_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        for member in range(len(self.embeddings)):
            patches = flatten_patches(self.embed(images, member))
            patches = patches.reshape(-1, patches.shape[-1])
            if len(self._features) == member:
                total = len(self.trainer.train_dataloader.dataset) * len(patches) // len(images)
                empty = torch.empty(total, patches.shape[1], dtype=self.feature_dtype)
                self._features.append(empty)
            filled = self._filled[member]
            self._features[member][filled : filled + len(patches)] = patches
            self._filled[member] += len(patches)

    def on_train_epoch_end(self) -> None:
        """Selects each member's coreset and frees the training patches.

        Patches wait in host memory (larger than a GPU's); selection, the bank and the search
        then run on the module's device, so `trainer.accelerator=gpu` moves all three there.
        """
        generator = torch.Generator().manual_seed(self.seed)
        self.banks, self.statistics = [], []
        for member, scorer in enumerate(self.scorers):
            features = self._features[member][: self._filled[member]].to(self.device)
            selected = self.sampler.select(features, generator)
            self.banks.append(features[selected].float())
            scorer.fit(self.banks[-1])
            if self.is_ensemble:
                stats = normal_statistics(features, selected, scorer.index, generator)
                self.statistics.append(stats)
            self._features[member] = torch.empty(0, 0)
        self._features, self._filled = [], [0] * len(self.embeddings)

    def load_banks(
        self, banks: list[torch.Tensor], statistics: list[tuple[float, float]] | None = None
    ) -> None:
        """Restores saved memory banks (and an ensemble's statistics) to score without refitting."""
        if len(banks) != len(self.embeddings):
            raise ValueError(f"{len(banks)} banks for {len(self.embeddings)} backbones")
        if self.is_ensemble and (statistics is None or len(statistics) != len(banks)):
            raise ValueError("an ensemble's banks need each member's normal statistics")
        self.banks = [bank.float().to(self.device) for bank in banks]
        self.statistics = list(statistics or [])
        for scorer, bank in zip(self.scorers, self.banks, strict=True):
            scorer.fit(bank)

    def on_test_start(self) -> None:
        if not self.banks:
            raise RuntimeError("The memory bank is empty: fit the model or load a bank first")
        self._test_batches = []

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> (B,) image scores, (B, H, W) maps, (B, h, w) patch scores.

        An ensemble's scores are its members' standardised scores, averaged.
        """
        grids, image_scores = [], []
        for member, scorer in enumerate(self.scorers):
            embedding = self.embed(images, member)
            batch, _, height, width = embedding.shape
            patch_scores, scores = scorer.score(flatten_patches(embedding))
            grid = patch_scores.reshape(batch, height, width)
            if self.is_ensemble:
                stats = self.statistics[member]
                grid, scores = standardised(grid, stats), standardised(scores, stats)
            grids.append(grid)
            image_scores.append(scores)
        grid = combine_grids(grids) if self.is_ensemble else grids[0]
        image_score = torch.stack(image_scores).mean(0)
        return image_score, anomaly_maps(grid, tuple(images.shape[-2:]), self.blur_sigma), grid

    def test_step(self, batch: dict, batch_idx: int) -> None:
        image_scores, maps, grid = self.predict(batch["image"])
        labels, masks, known = batch["label"], batch["mask"], batch["mask_known"]
        self._test_batches.append((image_scores, labels, maps, masks, grid, known))

    def on_test_epoch_end(self) -> None:
        columns = [torch.cat(parts).cpu() for parts in zip(*self._test_batches, strict=True)]
        self.outputs = TestOutputs(*columns)
        self._test_batches = []
