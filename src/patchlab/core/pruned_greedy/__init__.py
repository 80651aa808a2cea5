"""Exact greedy k-center selection with triangle-inequality pruning ("accelerated Gonzalez").

The plain loop reads every patch at every step: N x keep distances. Here each patch keeps its
nearest center so far, and each center the largest distance among its members (its radius).
When a new center c arrives, a member x of center a can only move to c if
d(x, a) > d(a, c) / 2, so a cluster with d(a, c) >= 2 r_a is skipped unread, and in the
others only the tail of members beyond d(a, c) / 2 is read. The next center, the patch
farthest from every center, is the farthest member of the widest cluster (`widest_heap`).
The selection is the plain loop's, up to float rounding and ties (lowest index wins, as in
its argmax).

What makes it fast at 10^6 patches is memory, not arithmetic:
- Members live in an arena, each cluster one contiguous segment in ascending distance, so a
  tail is one short stream and the cluster's radius is its last member. Movers go to the end
  of the arena; the arena is compacted when full.
- Distances are tested in stages, each a lower bound of the next, so that the bytes read per
  member shrink: 16 principal axes quantised to int8, then 48 principal axes in float32, then
  the exact distance in the original coordinates (the one the plain loop would take).
- Each stage first gathers the survivors of the whole step, then reads them with prefetches
  several items ahead, so that many cache misses are in flight at once.
- The per-step center test (all centers against the new one: the O(keep^2) part) reads the
  16 quantised axes, one byte each, laid out axis by axis so that it vectorises.

Every bound is a lower bound of the exact distance with a margin for float32 rounding
(MARGIN, SLACK) and for the int8 rounding (each vector's own quantisation error), so a
bound only ever skips what the exact distance would skip too.
"""

import numpy as np

from patchlab.core.pruned_greedy.bounds import bound_basis
from patchlab.core.pruned_greedy.loop import pruned_greedy

__all__ = ["bound_basis", "pruned_greedy", "warm_up"]


def warm_up() -> None:
    """Compiles the selection (or loads it from numba's cache) for the argument types
    `PrunedGreedyCoresetSampler` passes: numba compiles every branch on first call."""
    points = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    mean, basis = bound_basis(points)
    pruned_greedy(points, 0, 30, mean, basis)
