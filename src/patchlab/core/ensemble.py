"""Backbone ensembles: each member scores against its own bank; scores meet on one scale.

Members' raw distances are not comparable: each backbone's features have their own width
and spread, so a plain average would be ruled by the widest. Each member's scores are
standardised by the mean and spread of its own nearest-neighbour distances on normal
training patches, the only data known to be good, and the standardised scores are averaged.
"""

import torch
import torch.nn.functional as F

from patchlab.core.search import SearchIndex

STATISTICS_SAMPLE = 10_000  # training patches per member; the mean and std settle well before


def normal_statistics(
    features: torch.Tensor,
    selected: torch.Tensor,
    index: SearchIndex,
    generator: torch.Generator,
    sample: int = STATISTICS_SAMPLE,
) -> tuple[float, float]:
    """Mean and std of leave-one-out nearest-neighbour distances of training patches.

    A sample of the (N, D) training `features` is searched in the bank, the `selected` rows
    indexed by `index`. A sampled patch that is itself in the bank would find itself at
    distance 0, so its second neighbour counts instead: every distance is to another patch,
    as it is for a test patch.
    """
    count = len(features)
    rows = torch.randperm(count, generator=generator)[: min(sample, count)]
    in_bank = torch.zeros(count, dtype=torch.bool)
    in_bank[selected.cpu()] = True
    distances, _ = index.search(features[rows.to(features.device)].float(), 2)
    distances = distances.cpu()
    nearest = torch.where(in_bank[rows], distances[:, 1], distances[:, 0])
    return float(nearest.mean()), float(nearest.std(correction=0).clamp(min=1e-12))


def standardised(scores: torch.Tensor, statistics: tuple[float, float]) -> torch.Tensor:
    """Scores in units of the member's normal spread, 0 at its normal mean."""
    mean, std = statistics
    return (scores - mean) / std


def combine_grids(grids: list[torch.Tensor]) -> torch.Tensor:
    """Averages (B, h_i, w_i) standardised patch-score grids on the finest of them.

    Members with coarser grids are resized bilinearly first, as deeper layers are within
    one member; cells a member did not score (NaN) are left out of its resize and the mean.
    """
    size = max((grid.shape[-2:] for grid in grids), key=lambda shape: shape[0] * shape[1])
    resized = [grid if grid.shape[-2:] == size else _resized(grid, size) for grid in grids]
    stacked = torch.stack(resized)
    return stacked.nanmean(0) if bool(torch.isnan(stacked).any()) else stacked.mean(0)


def _resized(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear; NaN cells (not scored) are left out, NaN where no scored cell reaches."""

    def bilinear(values: torch.Tensor) -> torch.Tensor:
        return F.interpolate(values[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    scored = ~torch.isnan(grid)
    if bool(scored.all()):
        return bilinear(grid)
    weight = bilinear(scored.float())
    return torch.where(
        weight > 1e-6, bilinear(grid.nan_to_num(0.0)) / weight.clamp(min=1e-6), float("nan")
    )
