"""Greedy k-center coreset selection (PatchCore section 3.2): which training patches the bank keeps.

A sampler is one class with `choose(features, keep, rng, stop)`; a YAML file in
`conf/sampler/` names it (`_target_`) with its constructor's arguments. How many rows to keep
is the detector's `coreset_ratio`, not the sampler's.
"""

import math
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import faiss
import numpy as np
import torch
from torch import Generator, Tensor
from tqdm.auto import tqdm

from patchlab.errors import check_limits

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Stop = Callable[[], None]  # raises to abandon a long computation; returns to let it go on
STOP_POLL_SECONDS = 0.1


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
        check_limits(self.LIMITS, locals())
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


def stoppable(compiled: Callable[..., np.ndarray], stop: Stop | None, *args: object) -> np.ndarray:
    """Runs GIL-free compiled code; with `stop`, in a worker thread, asking `stop` in between.

    A compiled call of a minute cannot look at Python state. Run beside the waiting thread,
    it can be abandoned: when `stop` raises, the raise reaches the caller at once, and the
    abandoned worker computes on (one core) until its loop ends or the process exits.
    """
    if stop is None:
        return compiled(*args)
    result: list[np.ndarray] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(compiled(*args))
        except BaseException as error:  # handed to the waiting thread, which raises it
            failure.append(error)

    thread = threading.Thread(target=work, name="pruned-greedy", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(STOP_POLL_SECONDS)
        stop()
    if failure:
        raise failure[0]
    return result[0]


class GroupedGreedyCoresetSampler(GreedyCoresetSampler):
    """Greedy k-center, approximate: fast where pruning cannot prune (textures, big inputs).

    Exact greedy pays one pass over all N patches per pick; on textured surfaces the
    triangle-inequality pruning of `PrunedGreedyCoresetSampler` skips little of it (596k
    magnetic-tile patches: 236 s). Here the projected patches are split into k-means groups,
    and each round takes many picks at once:

    1. the `candidates` farthest patches are taken; below the last of them lies every other
       patch's distance, so greedy's order among them is exact while the farthest remaining
       candidate is still at least that far;
    2. the round's new centres then lower the running distances of the patches in their
       `neighbours` nearest groups only, in one matrix product per group.

    Step 2 is the approximation: a patch outside those groups keeps an overestimated distance
    and may later be picked although something already covers it. docs/coreset.md reports the
    coverage radius against exact greedy on bottle and magnetic tile.

    Args:
        groups: k-means groups; None: one per 2,000 patches, at least 16.
        neighbours: Groups (nearest to a new centre) whose distances it lowers.
        candidates: Farthest patches examined per round.
    """

    LIMITS: ClassVar = {  # a literal for the preflight
        "projection_dim": [(">=", 1)],
        "groups": [(">=", 1)],
        "neighbours": [(">=", 1)],
        "candidates": [(">=", 1)],
    }
    PATCHES_PER_GROUP = 2000

    def __init__(
        self,
        projection_dim: int | None = 128,
        groups: int | None = None,
        neighbours: int = 6,
        candidates: int = 1024,
        progress: bool = True,
    ) -> None:
        check_limits(self.LIMITS, locals())
        super().__init__(projection_dim, "float32", progress)
        self.groups, self.neighbours, self.candidates = groups, neighbours, candidates

    def choose(self, features: Tensor, keep: int, rng: Generator, stop: Stop | None) -> Tensor:
        projected = random_projection(features, self.projection_dim, rng).cpu()
        first = int(torch.randint(len(projected), (1,), generator=rng))  # the plain loop's draw
        groups = self.groups or max(16, len(projected) // self.PATCHES_PER_GROUP)
        grouped = Groups(projected, min(groups, len(projected)), int(rng.initial_seed()))
        chosen = grouped.greedy(grouped.position[first], keep, self, stop)
        return grouped.order[chosen].to(features.device)


class Groups:
    """Projected patches sorted by k-means group, with their running distance to the centres."""

    def __init__(self, points: Tensor, count: int, seed: int) -> None:
        points = np.ascontiguousarray(points.numpy(), dtype=np.float32)
        sample = points[:: max(1, len(points) // (count * 64))]  # 64 per group trains k-means
        kmeans = faiss.Kmeans(points.shape[1], count, niter=10, seed=seed % 2**31)
        kmeans.train(np.ascontiguousarray(sample))
        label = torch.from_numpy(kmeans.index.search(points, 1)[1][:, 0])
        self.order = torch.argsort(label, stable=True)
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(len(self.order))
        self.starts = torch.bincount(label, minlength=count).cumsum(0).tolist()
        self.points = torch.from_numpy(points)[self.order]
        self.centroids = torch.from_numpy(kmeans.centroids)
        self.sq_norms = self.points.square().sum(1)
        self.distance = torch.full((len(points),), float("inf"))

    def span(self, group: int) -> slice:
        return slice(self.starts[group - 1] if group else 0, self.starts[group])

    def lower(self, rows: slice, centres: Tensor) -> None:
        """Lowers the running squared distances of `rows` to their nearest of `centres`."""
        if rows.start == rows.stop:
            return
        sq_norms = self.sq_norms[centres, None]
        products = torch.addmm(sq_norms, self.points[centres], self.points[rows].t(), alpha=-2)
        nearest = torch.amin(products, 0).add_(self.sq_norms[rows])
        torch.minimum(self.distance[rows], nearest, out=self.distance[rows])

    def round_picks(self, keep: int, candidates: int) -> Tensor:
        """Greedy's next picks among the farthest `candidates` patches (at most `keep`)."""
        far, rows = torch.topk(self.distance, min(candidates, len(self.distance)))
        floor = float(far[-1])  # no other patch is farther than this
        points, sq_norms = self.points[rows], self.sq_norms[rows]
        between = torch.addmm(sq_norms[:, None], points, points.t(), alpha=-2).add_(sq_norms)
        # numpy: a call on 1024 floats costs a microsecond, a torch call several
        far, between = far.numpy(), between.numpy()
        picks: list[int] = []
        while len(picks) < keep:
            best = int(far.argmax())
            if picks and far[best] < floor:
                break
            picks.append(best)
            np.minimum(far, between[best], out=far)
            far[best] = -1.0
        return rows[picks]

    def greedy(
        self, first: int, keep: int, sampler: GroupedGreedyCoresetSampler, stop: Stop | None
    ) -> Tensor:
        """`keep` picks, in order, starting at sorted row `first`.

        Each round's group updates run in two threads of one torch thread each: the products
        are small (a group's ~2,000 rows by a few centres), where torch's own threads mostly
        wait on each other.
        """
        self.lower(slice(0, len(self.distance)), torch.tensor([first]))
        chosen = [torch.tensor([first])]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with (
                ThreadPoolExecutor(2) as pool,
                tqdm(total=keep, desc="coreset", unit="pick", disable=not sampler.progress) as bar,
            ):
                bar.update(1)
                while (taken := sum(map(len, chosen))) < keep:
                    picks = self.round_picks(keep - taken, sampler.candidates)
                    work = self.updates(picks, sampler.neighbours)
                    list(pool.map(self.lower_all, (work[0::2], work[1::2])))
                    self.distance[picks] = 0.0
                    chosen.append(picks)
                    bar.update(len(picks))
                    if stop is not None:
                        stop()
        finally:
            torch.set_num_threads(threads)
        return torch.cat(chosen)

    def updates(self, picks: Tensor, neighbours: int) -> list[tuple[slice, Tensor]]:
        """(rows of a group, the new centres among whose `neighbours` nearest groups it is)."""
        near = torch.cdist(self.points[picks], self.centroids)
        near = near.topk(min(neighbours, len(self.centroids)), largest=False).indices
        group, pair = near.flatten().sort(stable=True)
        groups, counts = torch.unique_consecutive(group, return_counts=True)
        centres = picks[pair // near.shape[1]].split(counts.tolist())
        return [(self.span(g), c) for g, c in zip(groups.tolist(), centres, strict=True)]

    def lower_all(self, work: list[tuple[slice, Tensor]]) -> None:
        for rows, centres in work:
            self.lower(rows, centres)


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
        loads what it cached. A job starts it before its own heavy imports (jobs/train.py).
        """
        if PrunedGreedyCoresetSampler.compiling is None:
            command = [sys.executable, "-m", "patchlab.core.pruned_greedy"]
            compiling = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            PrunedGreedyCoresetSampler.compiling = compiling

    def choose(self, features: Tensor, keep: int, rng: Generator, stop: Stop | None) -> Tensor:
        count = features.shape[0]
        on_cpu = features.device.type == "cpu"
        if count <= self.PLAIN_BELOW or self.dtype != torch.float32 or not on_cpu:
            return super().choose(features, keep, rng, stop)
        if self.approximate_above is not None and count > self.approximate_above:
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
