"""Nearest-neighbour search over the memory bank.

An index is one class with `fit(bank)` and `search(queries, k)`; a YAML file in `conf/search/`
names it (`_target_`) with its constructor's arguments, and `search=<file>` chooses it.
Indexes answer on the device of the queries; a bank on a GPU is searched there.
"""

import math
from typing import ClassVar

import faiss
import torch

from patchlab.errors import SettingError, check_limits


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN by Euclidean distance in torch, on the tensors' device, in query chunks.

    Memory stays at (chunk_size x bank) floats however many queries come in, instead of the
    full (queries x bank) matrix.

    Returns:
        (Q, k) distances, ascending, and (Q, k) bank indices.
    """
    bank_sq = bank.square().sum(1)
    distances, indices = [], []
    for chunk in queries.split(chunk_size):
        sq = torch.addmm(bank_sq, chunk, bank.t(), alpha=-2).add_(chunk.square().sum(1, True))
        dist, index = sq.topk(k, dim=1, largest=False) if k > 1 else sq.min(1, keepdim=True)
        distances.append(dist.clamp_(min=0).sqrt_())
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


class SearchIndex:
    """Euclidean k-NN over an (M, D) bank; subclasses choose how exactly."""

    def check_bank_size(self, size: int) -> None:
        """Raises a SettingError when a bank of `size` entries is too small for this index."""

    def fit(self, bank: torch.Tensor) -> None:
        """Indexes the (M, D) float32 bank."""
        raise NotImplementedError

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> (Q, k) distances, ascending, and (Q, k) bank indices."""
        raise NotImplementedError


class _FaissIndex(SearchIndex):
    def __init__(self) -> None:
        self.faiss_index: faiss.Index | None = None

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        squared, nearest = self.faiss_index.search(queries.float().cpu().contiguous().numpy(), k)
        distances = torch.from_numpy(squared).clamp_(min=0).sqrt_()
        return distances.to(queries.device), torch.from_numpy(nearest).to(queries.device)


class ExactIndex(_FaissIndex):
    """The paper's exact search: faiss's `IndexFlatL2` on the CPU, torch on a GPU.

    On the CPU faiss fuses the distance products with the arg-min in cache-sized blocks: twice
    as fast as the chunked torch search here, with memory bounded by its blocks. A bank on a
    GPU stays there and is searched with `nearest_neighbours` (faiss-gpu is not on PyPI).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bank: torch.Tensor | None = None

    def fit(self, bank: torch.Tensor) -> None:
        if bank.device.type != "cpu":
            self.bank, self.faiss_index = bank, None
            return
        self.bank = None
        self.faiss_index = faiss.IndexFlatL2(bank.shape[1])
        self.faiss_index.add(bank.numpy())

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is not None:
            return nearest_neighbours(queries.float().to(self.bank.device), self.bank, k)
        return super().search(queries, k)


class IVFIndex(_FaissIndex):
    """faiss's inverted-file index: approximate, several times faster on big banks.

    It runs on the CPU wherever the bank is (faiss-gpu is not on PyPI); results come back on
    the queries' device.

    The bank is split into `ivf_lists` k-means cells and each query is compared only with the
    bank entries of its `ivf_probes` nearest cells. A missed neighbour can only raise a
    patch's score, never lower it (on bottle at 8 probes: 0.3% of patches, by at most 11%).

    Args:
        ivf_lists: Number of cells; None picks 2 sqrt(bank size) (256 for a 16k bank), at
            most one per 39 entries. Growing with the square root keeps both the k-means
            training and the per-query scan small on big banks.
        ivf_probes: Cells searched per query; more is slower and closer to exact.
    """

    LIMITS: ClassVar = {
        "ivf_lists": [(">=", 1)],
        "ivf_probes": [(">=", 1)],
    }  # a literal for the preflight

    def __init__(self, ivf_lists: int | None = None, ivf_probes: int = 8) -> None:
        super().__init__()
        check_limits(self.LIMITS, locals())
        self.ivf_lists = ivf_lists
        self.ivf_probes = ivf_probes

    def check_bank_size(self, size: int) -> None:
        if self.ivf_lists is not None and self.ivf_lists > size:
            raise SettingError(
                f"{{ivf_lists}}={self.ivf_lists} is larger than the memory bank ({size} "
                "patches); lower it or leave it null to pick 2 sqrt(bank size)"
            )

    def fit(self, bank: torch.Tensor) -> None:
        size, dim = bank.shape
        self.check_bank_size(size)
        # faiss's k-means wants at least 39 training entries per cell.
        lists = self.ivf_lists or max(1, min(round(2 * math.sqrt(size)), size // 39))
        self.faiss_index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
        bank = bank.cpu().numpy()
        self.faiss_index.train(bank)
        self.faiss_index.nprobe = min(self.ivf_probes, lists)
        self.faiss_index.add(bank)
