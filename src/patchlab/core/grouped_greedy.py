"""Greedy k-center, approximate: the coreset for inputs where pruning cannot prune.

`PrunedGreedyCoresetSampler` hands inputs above its `approximate_above` patches here;
`sampler=greedy_coreset_grouped` uses it at every size. docs/coreset.md measures it against
the exact selection on bottle and magnetic tile.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import faiss
import numpy as np
import torch
from torch import Generator, Tensor
from tqdm.auto import tqdm

from patchlab.core.coreset import GreedyCoresetSampler, random_projection
from patchlab.core.stoppable import Stop
from patchlab.errors import check_limits


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
