"""Greedy k-center coreset selection (PatchCore section 3.2): which training patches the bank keeps.

A sampler is one class with `choose(features, keep, rng, stop)`; a YAML file in
`conf/sampler/` names it (`_target_`) with its constructor's arguments. How many rows to keep
is the detector's `coreset_ratio`, not the sampler's.
"""

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Generator, Tensor
from tqdm.auto import tqdm

from patchlab.core.stoppable import Stop, stoppable
from patchlab.errors import check_limits

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_projection(
    features: torch.Tensor, dim: int | None, generator: torch.Generator
) -> torch.Tensor:
    """Johnson-Lindenstrauss projection to `dim` columns; narrower features pass through."""
    if dim is None or features.shape[1] <= dim:
        return features.float()
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features.float() @ matrix.to(features.device)


class CoresetSampler:
    """Chooses the memory bank's rows from all training patches.

    Configured in `__init__`, stateless between calls: `choose` sees the features, how many
    rows to keep (fewer than there are), a seeded generator and an optional `stop` callback.
    """

    def select(
        self, features: Tensor, keep: int, generator: Generator, stop: Stop | None = None
    ) -> Tensor:
        """Indices of `keep` rows of (N, D) `features`; `stop` is asked while it works and
        raises to abandon it. All of them when `keep` >= N."""
        if keep >= len(features):
            return torch.arange(len(features))
        return self.choose(features, keep, generator, stop)

    @classmethod
    def prepare(cls) -> None:
        """Starts, in the background, any one-off work `choose` will need (a compile)."""

    def choose(self, features: Tensor, keep: int, rng: Generator, stop: Stop | None) -> Tensor:
        raise NotImplementedError


class GreedyCoresetSampler(CoresetSampler):
    """Picks the subset whose farthest member is as close as possible to every other patch.

    Each step reads the projected features once: one matrix-vector product against
    precomputed squared norms (||x||^2 - 2 x.c + ||c||^2) and an in-place running minimum, with
    every buffer allocated before the loop, on the features' device (a GPU streams the whole
    projection per step in well under a millisecond on bottle).

    Args:
        projection_dim: Columns of the random projection distances are measured in.
        coreset_dtype: "float32", or "bfloat16"/"float16" to halve the bytes read per step.
        progress: Show a progress bar with steps/s.
    """

    LIMITS: ClassVar = {  # a literal for the preflight
        "projection_dim": [(">=", 1)],
        "coreset_dtype": [("in", ["float32", "bfloat16", "float16"])],
    }

    def __init__(
        self,
        projection_dim: int | None = 128,
        coreset_dtype: str = "float32",
        progress: bool = True,
    ) -> None:
        check_limits(GreedyCoresetSampler.LIMITS, locals())  # a subclass's own come on top
        self.projection_dim = projection_dim
        self.dtype = _DTYPES[coreset_dtype]
        self.progress = progress

    def choose(self, features: Tensor, keep: int, rng: Generator, stop: Stop | None) -> Tensor:
        """The coreset rows of (N, D) `features`, in selection order; `stop` runs every step."""
        count = features.shape[0]
        projected = random_projection(features, self.projection_dim, rng)
        sq_norms = projected.square().sum(1)
        # Measured with MKL: fp32 gemv streams fastest over (d, N), fp16/bf16 over (N, d).
        if self.dtype == torch.float32:
            projected = projected.t().contiguous().t()
        else:
            projected = projected.to(self.dtype).contiguous()
        device = features.device
        dots = torch.empty(count, dtype=self.dtype, device=device)
        candidate = torch.empty(count, device=device)
        min_dist = torch.full((count,), float("inf"), device=device)
        selected = torch.empty(keep, dtype=torch.long)
        index = int(torch.randint(count, (1,), generator=rng))
        for step in tqdm(range(keep), desc="coreset", unit="step", disable=not self.progress):
            selected[step] = index
            torch.mv(projected, projected[index].contiguous(), out=dots)
            torch.add(sq_norms, dots, alpha=-2, out=candidate)
            candidate.add_(sq_norms[index])
            torch.minimum(min_dist, candidate, out=min_dist)
            index = int(min_dist.argmax())
            if stop is not None:
                stop()
        return selected


class PrunedGreedyCoresetSampler(GreedyCoresetSampler):
    """The same selection as GreedyCoresetSampler, exact, with most distances never computed.

    See `core/pruned_greedy/`: on bottle a step reads the tails of a few hundred clusters, ~2% of
    the patches, and measures well under 0.1% exactly. It is CPU code in float32. The plain
    loop runs instead for features on a GPU (where one full pass per step is cheap and stays
    on the device), for float16/bfloat16, and for inputs of at most `PLAIN_BELOW` patches
    (where compiling would cost more than it saves).

    Pruning pays on patches that cluster tightly (bottle: 164k in 3.6 s) and barely at all on
    textures (magnetic tile: 596k in 236 s). Above `approximate_above` patches the grouped
    approximation runs instead (`GroupedGreedyCoresetSampler`, 8.5 s there, coverage radius
    within 0.4% of this selector's; docs/coreset.md).

    Args:
        approximate_above: Patches above which the grouped approximation runs; None: never.
    """

    PLAIN_BELOW = 2048
    LIMITS: ClassVar = {"approximate_above": [(">=", 1)]}  # with the base's, for the preflight

    def __init__(
        self,
        projection_dim: int | None = 128,
        coreset_dtype: str = "float32",
        progress: bool = True,
        approximate_above: int | None = None,
    ) -> None:
        super().__init__(projection_dim, coreset_dtype, progress)
        check_limits(self.LIMITS, locals())
        self.approximate_above = approximate_above

    compiling: ClassVar[subprocess.Popen | None] = None  # one compile per process

    @classmethod
    def prepare(cls) -> None:
        """Compiles the selection in another process while the features are extracted.

        numba compiles it on first use after an install (about 30 s of one core) and caches
        the machine code in the package's `__pycache__`; later runs load it in 0.5 s. A
        separate process keeps the compile off this one's GIL; `choose` waits for it, then
        loads what it cached. A job starts it before its own heavy imports (jobs/train.py),
        and only where numba's cache does not hold the selection yet.
        """
        if PrunedGreedyCoresetSampler.compiling is None and not _compiled_before():
            command = [sys.executable, "-m", "patchlab.core.pruned_greedy"]
            compiling = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            PrunedGreedyCoresetSampler.compiling = compiling

    def choose(self, features: Tensor, keep: int, rng: Generator, stop: Stop | None) -> Tensor:
        count = features.shape[0]
        on_cpu = features.device.type == "cpu"
        if count <= self.PLAIN_BELOW or self.dtype != torch.float32 or not on_cpu:
            return super().choose(features, keep, rng, stop)
        if self.approximate_above is not None and count > self.approximate_above:
            from patchlab.core.grouped_greedy import GroupedGreedyCoresetSampler  # builds on this

            grouped = GroupedGreedyCoresetSampler(self.projection_dim, progress=self.progress)
            return grouped.choose(features, keep, rng, stop)
        if PrunedGreedyCoresetSampler.compiling is not None:
            PrunedGreedyCoresetSampler.compiling.wait()
        from patchlab.core.pruned_greedy import bound_basis, pruned_greedy  # numba, when used

        projected = random_projection(features, self.projection_dim, rng)
        first = int(torch.randint(count, (1,), generator=rng))  # the plain loop's draw
        points = np.ascontiguousarray(projected.numpy(), dtype=np.float32)
        mean, basis = bound_basis(points)
        return torch.from_numpy(stoppable(pruned_greedy, stop, points, first, keep, mean, basis))


def _compiled_before() -> bool:
    """Whether numba's cache (NUMBA_CACHE_DIR, else the package's `__pycache__`) holds the
    selection's loop; a stale entry is compiled again where it is used."""
    cache = os.environ.get("NUMBA_CACHE_DIR")
    folder = Path(cache) if cache else Path(__file__).with_name("pruned_greedy") / "__pycache__"
    return folder.is_dir() and next(folder.rglob("loop.select-*.nbc"), None) is not None
