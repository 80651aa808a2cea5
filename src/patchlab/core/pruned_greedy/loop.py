"""The selection loop: one new center per step, the farthest member of the widest cluster."""

import numpy as np
from numba import njit

from patchlab.core.pruned_greedy.arena import compact, first_cluster, grown, move, sort_segment
from patchlab.core.pruned_greedy.bounds import quantise, reach
from patchlab.core.pruned_greedy.stages import (
    exact_stage,
    float_stage,
    losing_clusters,
    quantised_stage,
    tails,
)
from patchlab.core.pruned_greedy.widest_heap import sift_down, sift_up


@njit(cache=True)
def new_center(step: int, new_rot: np.ndarray, centers: tuple, scale: np.ndarray) -> None:
    center_rot, center_levels, center_err, _ = centers
    for q in range(len(new_rot)):
        center_rot[step, q] = new_rot[q]
    center_err[step] = quantise(new_rot, scale, center_levels[:, step])


@njit(cache=True)
def set_radius(
    a: int, arena: tuple, clusters: tuple, centers: tuple, largest: float, count: int
) -> None:
    """Radius and farthest member from the segment's last member; the center-pass limit."""
    index, dist, _, _, _ = arena
    start, sizes, radius, farthest = clusters
    center_rot, _, center_err, center_limit = centers
    last = start[a] + sizes[a] - 1
    radius[a] = dist[last] if sizes[a] else np.float32(-1.0)
    farthest[a] = index[last] if sizes[a] else count
    norm = center_rot[a, center_rot.shape[1] - 1]
    center_limit[a] = reach(4.0 * radius[a], center_err[a], norm, largest)


def pruned_greedy(
    points: np.ndarray,
    first: int,
    keep: int,
    mean: np.ndarray,
    basis: np.ndarray,
    spare: int = -1,
) -> np.ndarray:
    """Indices of `keep` rows of the (N, D) float32 `points`, in selection order.

    Distances are squared Euclidean in float32; `first` is the seeded first pick; `mean` and
    the orthonormal (D, m) `basis` give the bounds (see `bound_basis`). `spare` is the arena
    room beyond N (default N): less compacts more often, and the arena grows when a step
    needs more. Room costs address space, not memory, until movers fill it; growing copies
    the arena, and the early steps (where half the patches may move at once) made bottle's
    selection peak at twice its memory with N / 4.
    """
    count = len(points)
    if not 1 <= keep <= count:
        raise ValueError("keep must be between 1 and the number of points")
    spare = count if spare < 0 else spare
    capacity = count + spare + 1
    arena, scale, largest = first_cluster(points, first, mean, basis, capacity)
    row = int(np.flatnonzero(arena[0][:count] == first)[0])  # the first center's arena row
    return select(points, first, row, keep, arena, scale, largest, spare, capacity)


# fastmath lets the distance sums vectorise; comparisons see no NaN or inf.
# nogil: it runs beside the main thread (stoppable).
@njit(cache=True, fastmath=True, nogil=True)
def select(
    points: np.ndarray,
    first: int,
    row: int,
    keep: int,
    arena: tuple,
    scale: np.ndarray,
    largest: float,
    spare: int,
    capacity: int,
) -> np.ndarray:
    """The selection loop over the first cluster's arena (`row`: the first center's row)."""
    count = len(points)
    axes = arena[4].shape[1] - 1
    clusters = (
        np.zeros(keep, dtype=np.int64),  # start of each cluster's segment in the arena
        np.zeros(keep, dtype=np.int64),  # its size
        np.full(keep, np.float32(-1.0)),  # radius, squared; -1: empty
        np.zeros(keep, dtype=np.int64),  # farthest member
    )
    start, sizes, radius, _ = clusters
    centers = (
        np.empty((keep, axes + 1), dtype=np.float32),  # rotated axes, |center - mean|^2
        np.empty((len(scale), keep), dtype=np.int8),  # int8 axes, axis by axis
        np.empty(keep, dtype=np.float32),  # squared quantisation error
        np.empty(keep, dtype=np.float32),  # center-pass limit
    )
    center_rot = centers[0]  # the new center's row there: the arena's rows move in a step
    heap, place = np.zeros(keep, dtype=np.int64), np.zeros(keep, dtype=np.int64)
    listed, tail = np.empty(keep, dtype=np.int64), np.empty(keep, dtype=np.int64)
    half, estimate = np.empty(keep, dtype=np.float32), np.empty(keep, dtype=np.float32)
    found, moved_dist = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.float32)
    selected = np.empty(keep, dtype=np.int64)
    selected[0] = first
    new_center(0, arena[4][row], centers, scale)
    sizes[0] = count
    set_radius(0, arena, clusters, centers, largest, count)
    used = count

    for step in range(1, keep):
        slot = start[heap[0]] + sizes[heap[0]] - 1
        new, new_rot = arena[0][slot], center_rot[step]
        selected[step] = new
        new_center(step, arena[4][slot], centers, scale)
        losing = losing_clusters(step, new_rot, centers, radius, scale, listed, half, estimate)
        room = tails(losing, listed, half, arena[1], start, sizes, tail)
        if used + room > capacity:
            used = compact(arena, start, sizes, step)
            if used + room > capacity:
                capacity = used + room + spare + 1
                arena = grown(arena, used, capacity)
        # The tails in three stages, each over the survivors of the one before.
        survivors = quantised_stage(
            new_rot, arena, scale, losing, listed, tail, start, sizes, found
        )
        closer = float_stage(new_rot, arena, found, survivors)
        movers = exact_stage(points, new, arena, found, closer, moved_dist)
        # Movers go to the new cluster's segment; each losing segment closes up in order.
        begin, t = used, 0
        for n in range(losing):
            a = listed[n]
            end = start[a] + sizes[a]
            lo = end - tail[n]
            if t < movers and lo <= found[t] < end:
                kept, used, t = move(
                    arena, used, movers, found, moved_dist, scale, largest, lo, end, t
                )
                sizes[a] = kept - start[a]
                set_radius(a, arena, clusters, centers, largest, count)
                sift_down(heap, place, place[a], step, radius, clusters[3])
        sort_segment(arena, begin, used)
        start[step], sizes[step] = begin, used - begin
        set_radius(step, arena, clusters, centers, largest, count)
        heap[step] = step
        sift_up(heap, place, step, radius, clusters[3])
    return selected
