"""Nearest-neighbour patch scores, the paper's image-score reweighting, and anomaly maps."""

import faiss
import torch
import torch.nn.functional as F


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN by Euclidean distance, `chunk_size` queries at a time.

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


class NearestNeighbourScorer:
    """Scores patches by their distance to the nearest memory-bank entry.

    The all-patches search runs through faiss's exact `IndexFlatL2`, which fuses the distance
    products with the arg-min in cache-sized blocks: twice as fast as the chunked torch path
    here, with memory bounded by its blocks. faiss reads the tensors' memory without copying.
    Only the reweighting's small bank-to-bank search (one anchor per image) uses the torch path.

    Args:
        num_neighbors: Bank neighbourhood size b of the reweighting (paper eq. 7); 1 turns
            reweighting off and the image score is the largest patch score.
    """

    def __init__(self, num_neighbors: int = 9) -> None:
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
        self.num_neighbors = num_neighbors
        self.bank = torch.empty(0, 0)
        self.index: faiss.IndexFlatL2 | None = None

    def fit(self, bank: torch.Tensor) -> None:
        """Keeps the (M, D) memory bank to score against."""
        if self.num_neighbors > bank.shape[0]:
            raise ValueError(
                f"num_neighbors={self.num_neighbors} is larger than the memory bank "
                f"({bank.shape[0]} patches); lower model.num_neighbors or raise model.coreset_ratio"
            )
        self.bank = bank.float().contiguous()
        self.index = faiss.IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank.numpy())

    def score(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B, P, D) patch embeddings to (B, P) patch scores and (B,) image scores."""
        batch, patches, dim = embeddings.shape
        flat = embeddings.reshape(-1, dim).float().contiguous()
        squared, nearest = self.index.search(flat.numpy(), 1)
        patch_scores = torch.from_numpy(squared).clamp_(min=0).sqrt_().reshape(batch, patches)
        nearest = torch.from_numpy(nearest).reshape(batch, patches)
        top_score, top_patch = patch_scores.max(1)
        if self.num_neighbors == 1:
            return patch_scores, top_score
        rows = torch.arange(batch)
        top_features = embeddings[rows, top_patch].float()
        anchor = self.bank[nearest[rows, top_patch]]
        # N_b(m*): the anchor's own neighbourhood in the bank, the anchor itself first.
        _, support = nearest_neighbours(anchor, self.bank, self.num_neighbors)
        support_dist = (top_features.unsqueeze(1) - self.bank[support]).norm(dim=2)
        weight = 1 - torch.softmax(support_dist, dim=1)[:, 0]
        return patch_scores, weight * top_score


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps, kernel truncated at 4 sigma."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


def anomaly_maps(
    patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0
) -> torch.Tensor:
    """(B, h, w) patch-score grids -> (B, H, W) pixel anomaly maps, upsampled then blurred."""
    grid = patch_scores.unsqueeze(1)
    maps = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps, sigma).squeeze(1)
