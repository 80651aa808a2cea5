"""Memory-bank samplers by name; greedy k-center coreset selection (PatchCore section 3.2)."""

import math
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from patchlab.core.pruned_greedy import bound_basis, pruned_greedy
from patchlab.errors import SettingError

T = TypeVar("T")

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
    """Chooses the memory bank's rows from all training patches; chosen by `sampler=`.

    Configured in `__init__`, stateless between calls: `select` sees the features and a
    seeded generator, nothing else. Subclasses implement `select`; registering one is one
    line in SAMPLERS, and its constructor arguments are model settings of the same names.
    """

    def __init__(self, coreset_ratio: float) -> None:
        if not 0 < coreset_ratio <= 1:
            raise SettingError(f"{{coreset_ratio}} must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = coreset_ratio

    def bank_size(self, count: int) -> int:
        """Rows kept from `count` patches."""
        return max(1, int(count * self.coreset_ratio))

    def select(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Returns the indices of the kept rows of (N, D) `features`."""
        raise NotImplementedError


class GreedyCoresetSampler(CoresetSampler):
    """Picks the subset whose farthest member is as close as possible to every other patch.

    Each step reads the projected features once: one matrix-vector product against
    precomputed squared norms (||x||^2 - 2 x.c + ||c||^2) and an in-place running minimum, with
    every buffer allocated before the loop, on the features' device (a GPU streams the whole
    projection per step in well under a millisecond on bottle).

    Args:
        coreset_ratio: Fraction of patches kept, in (0, 1].
        projection_dim: Columns of the random projection distances are measured in.
        coreset_dtype: "float32", or "bfloat16"/"float16" to halve the bytes read per step.
        progress: Show a progress bar with steps/s.
    """

    def __init__(
        self,
        coreset_ratio: float,
        projection_dim: int | None = 128,
        coreset_dtype: str = "float32",
        progress: bool = True,
    ) -> None:
        super().__init__(coreset_ratio)
        if coreset_dtype not in _DTYPES:
            raise SettingError(
                f"{{coreset_dtype}} must be one of {list(_DTYPES)}, got {coreset_dtype!r}"
            )
        self.projection_dim = projection_dim
        self.dtype = _DTYPES[coreset_dtype]
        self.progress = progress

    def select(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Returns the indices of the coreset rows of (N, D) `features`, in selection order."""
        count = features.shape[0]
        keep = self.bank_size(count)
        if keep >= count:
            return torch.arange(count)
        projected = random_projection(features, self.projection_dim, generator)
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
        index = int(torch.randint(count, (1,), generator=generator))
        for step in tqdm(range(keep), desc="coreset", unit="step", disable=not self.progress):
            selected[step] = index
            torch.mv(projected, projected[index].contiguous(), out=dots)
            torch.add(sq_norms, dots, alpha=-2, out=candidate)
            candidate.add_(sq_norms[index])
            torch.minimum(min_dist, candidate, out=min_dist)
            index = int(min_dist.argmax())
        return selected


def beside_main_thread(compiled: Callable[..., T], *args: object) -> T:
    """Runs GIL-free compiled code in a daemon thread and waits for it.

    Python handles signals only in the main thread, between bytecodes; during a minute-long
    compiled call it could not, and SLURM's SIGTERM would wait for the whole selection. Here
    the main thread waits interruptibly: a stop raises at once. The abandoned thread computes
    on (one core) until its loop ends or the process exits.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(compiled(*args))
        except BaseException as error:  # handed to the waiting thread, which raises it
            failure.append(error)

    thread = threading.Thread(target=work, name="pruned-greedy", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class PrunedGreedyCoresetSampler(GreedyCoresetSampler):
    """The same selection as GreedyCoresetSampler, exact, with most distances never computed.

    See `core/pruned_greedy/`: on bottle a step reads the tails of a few hundred clusters, ~2% of
    the patches, and measures well under 0.1% exactly. It is CPU code in float32. The plain
    loop runs instead for features on a GPU (where one full pass per step is cheap and stays
    on the device), for float16/bfloat16, and for inputs of at most `PLAIN_BELOW` patches
    (where compiling would cost more than it saves).
    """

    PLAIN_BELOW = 2048

    def select(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = features.shape[0]
        keep = self.bank_size(count)
        on_cpu = features.device.type == "cpu"
        if keep >= count or count <= self.PLAIN_BELOW or self.dtype != torch.float32 or not on_cpu:
            return super().select(features, generator)
        projected = random_projection(features, self.projection_dim, generator)
        first = int(torch.randint(count, (1,), generator=generator))  # the plain loop's draw
        points = np.ascontiguousarray(projected.numpy(), dtype=np.float32)
        mean, basis = bound_basis(points)
        return torch.from_numpy(beside_main_thread(pruned_greedy, points, first, keep, mean, basis))


# greedy_coreset is the pruned selector; greedy_coreset_plain the reference loop it must equal.
SAMPLERS: dict[str, type[CoresetSampler]] = {
    "greedy_coreset": PrunedGreedyCoresetSampler,
    "greedy_coreset_plain": GreedyCoresetSampler,
}
