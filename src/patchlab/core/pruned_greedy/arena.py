"""The arena: every cluster's members in one contiguous segment, in ascending distance.

A tail (the members beyond some distance) is then one short stream at a segment's end, and
the cluster's radius is its last member. Movers are appended at the arena's end and sorted
there as the new cluster's segment; the holes they leave are closed when the arena is full.
"""

import numpy as np
from numba import njit

from patchlab.core.pruned_greedy.bounds import (
    QUANTISED_AXES,
    member_gate,
    quantise,
    reach,
    sq_dist,
)


@njit(cache=True)
def member_order(dist: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Ascending distance, descending index among equals: the last member is the farthest
    and, among equally far ones, the lowest index (the plain loop's argmax)."""
    keys = np.empty(len(dist), dtype=np.int64)
    bits = dist.view(np.int32)  # non-negative float32 bits sort as the floats do
    for m in range(len(dist)):
        keys[m] = (np.int64(bits[m]) << 32) | (np.int64(0xFFFFFFFF) - index[m])
    return np.argsort(keys)


@njit(cache=True, fastmath=True)
def copy(source: tuple, src: int, target: tuple, dst: int) -> None:
    """One member's row, from `source` to `target` (the same arena or another one).

    Rows are copied item by item throughout: slices and fancy indexing make numba generate
    (and compile, on a first run) several times the code."""
    target[0][dst] = source[0][src]
    target[1][dst] = source[1][src]
    target[2][dst] = source[2][src]
    for q in range(source[3].shape[1]):
        target[3][dst, q] = source[3][src, q]
    for q in range(source[4].shape[1]):
        target[4][dst, q] = source[4][src, q]


@njit(cache=True)
def sort_segment(arena: tuple, lo: int, hi: int) -> None:
    index, dist, _, levels, rot = arena
    order = member_order(dist[lo:hi].copy(), index[lo:hi].copy())
    rows = new_arena(hi - lo, levels.shape[1], rot.shape[1] - 1)
    for m in range(hi - lo):
        copy(arena, lo + order[m], rows, m)
    for m in range(hi - lo):
        copy(rows, m, arena, lo + m)


@njit(cache=True)
def new_arena(capacity: int, quantised: int, axes: int) -> tuple:
    """Per member: patch index, squared distance to its center, stage-1 limit, int8 levels
    of the first axes, and the rotated axes followed by the squared distance from the mean
    (all D dimensions: the rounding slack is relative to it)."""
    return (
        np.empty(capacity, dtype=np.int64),
        np.empty(capacity, dtype=np.float32),
        np.empty(capacity, dtype=np.float32),
        np.empty((capacity, quantised), dtype=np.int8),
        np.empty((capacity, axes + 1), dtype=np.float32),
    )


@njit(cache=True)
def compact(arena: tuple, start: np.ndarray, sizes: np.ndarray, clusters: int) -> int:
    """Closes the holes movers left; returns the new end of the used arena."""
    end = 0
    for a in range(clusters):
        old = start[a]
        start[a] = end
        for j in range(old, old + sizes[a]):
            if j != end:
                copy(arena, j, arena, end)
            end += 1
    return end


@njit(cache=True)
def grown(arena: tuple, used: int, capacity: int) -> tuple:
    bigger = new_arena(capacity, arena[3].shape[1], arena[4].shape[1] - 1)
    for j in range(used):
        copy(arena, j, bigger, j)
    return bigger


@njit(cache=True, fastmath=True)
def distances_to(points: np.ndarray, first: int) -> np.ndarray:
    """Squared distances of every patch to the first center, summed as the exact stage sums."""
    first_dist = np.empty(len(points), dtype=np.float32)
    for i in range(len(points)):
        first_dist[i] = sq_dist(points, i, points, first)
    return first_dist


@njit(cache=True, fastmath=True)
def set_gates(arena: tuple, count: int, scale: np.ndarray, largest: float) -> None:
    """Quantises the first `count` members and sets their stage-1 limits."""
    _, dist, gate, levels, rot = arena
    axes = rot.shape[1] - 1
    for j in range(count):
        gate[j] = reach(dist[j], quantise(rot[j], scale, levels[j]), rot[j, axes], largest)


def first_cluster(
    points: np.ndarray, first: int, mean: np.ndarray, basis: np.ndarray, capacity: int
) -> tuple[tuple, np.ndarray, np.float32]:
    """The arena with every patch in the first center's cluster, in member order, and the
    int8 scale per axis and the largest squared distance from the mean.

    Plain numpy where numpy is as fast (the rotation is one matrix product): numba compiles
    every array expression on first use, and this setup was a third of that compile.
    """
    count, axes = len(points), basis.shape[1]
    quantised = min(QUANTISED_AXES, axes)
    arena = new_arena(capacity, quantised, axes)
    index, dist, _, _, rot = arena
    first_dist = distances_to(points, first)
    order = member_order(first_dist, np.arange(count))
    index[:count] = order
    dist[:count] = first_dist[order]
    for lo in range(0, count, 16384):  # bounded temporaries
        centred = points[order[lo : lo + 16384]] - mean
        rot[lo : lo + len(centred), :axes] = centred @ basis
        rot[lo : lo + len(centred), axes] = np.einsum("ij,ij->i", centred, centred)
    largest = np.float32(rot[:count, axes].max()) * np.float32(1.01)
    top = np.abs(rot[:count, :quantised]).max(0)
    scale = np.where(top > 1e-30, top / np.float32(126.0), np.float32(1.0)).astype(np.float32)
    set_gates(arena, count, scale, largest)
    return arena, scale, largest


@njit(cache=True)
def move(
    arena: tuple,
    used: int,
    movers: int,
    found: np.ndarray,
    moved_dist: np.ndarray,
    scale: np.ndarray,
    largest: float,
    lo: int,
    end: int,
    t: int,
) -> tuple[int, int, int]:
    """Moves one segment's movers (`found[t:]` inside [lo, end)) to the arena's end and
    closes the segment up in order; returns its new end, the arena's end and the next t."""
    _, dist, gate, levels, rot = arena
    kept = lo
    for j in range(lo, end):
        if t < movers and found[t] == j:
            copy(arena, j, arena, used)
            dist[used] = moved_dist[t]
            gate[used] = member_gate(dist[used], levels[used], rot[used], scale, largest)
            used += 1
            t += 1
        else:
            if kept != j:
                copy(arena, j, arena, kept)
            kept += 1
    return kept, used, t
