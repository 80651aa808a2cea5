"""Seeded, stratified split of a category's test set into validation and held-out parts."""

from collections import defaultdict

import torch


def stratified_split(
    defect_types: list[str], fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the validation and held-out parts; every defect type is split by `fraction`.

    A type with at least two images lands in both parts, so each part sees every defect type.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, defect_type in enumerate(defect_types):
        by_type[defect_type].append(index)
    generator = torch.Generator().manual_seed(seed)
    validation, held_out = [], []
    for defect_type in sorted(by_type):
        members = torch.tensor(by_type[defect_type])
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(len(members) * fraction)
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        validation += members[:count].tolist()
        held_out += members[count:].tolist()
    return (
        torch.tensor(sorted(validation), dtype=torch.long),
        torch.tensor(sorted(held_out), dtype=torch.long),
    )
