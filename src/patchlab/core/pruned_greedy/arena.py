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
def copy(arena: tuple, src: int, dst: int) -> None:
    index, dist, gate, levels, rot = arena
    index[dst] = index[src]
    dist[dst] = dist[src]
    gate[dst] = gate[src]
    for q in range(levels.shape[1]):
        levels[dst, q] = levels[src, q]
    for q in range(rot.shape[1]):
        rot[dst, q] = rot[src, q]


@njit(cache=True)
def sort_segment(arena: tuple, lo: int, hi: int) -> None:
    index, dist, gate, levels, rot = arena
    order = member_order(dist[lo:hi].copy(), index[lo:hi].copy())
    index[lo:hi] = index[lo:hi][order]
    dist[lo:hi] = dist[lo:hi][order]
    gate[lo:hi] = gate[lo:hi][order]
    levels[lo:hi] = levels[lo:hi][order]
    rot[lo:hi] = rot[lo:hi][order]


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
                copy(arena, j, end)
            end += 1
    return end


@njit(cache=True)
def grown(arena: tuple, used: int, capacity: int) -> tuple:
    index, dist, gate, levels, rot = arena
    grown = new_arena(capacity, levels.shape[1], rot.shape[1] - 1)
    grown[0][:used] = index[:used]
    grown[1][:used] = dist[:used]
    grown[2][:used] = gate[:used]
    grown[3][:used] = levels[:used]
    grown[4][:used] = rot[:used]
    return grown


@njit(cache=True, fastmath=True)
def first_cluster(
    points: np.ndarray, first: int, mean: np.ndarray, basis: np.ndarray, capacity: int
) -> tuple:
    """The arena with every patch in the first center's cluster, in member order, and the
    int8 scale per axis and the largest squared distance from the mean."""
    count = len(points)
    axes = basis.shape[1]
    quantised = min(QUANTISED_AXES, axes)
    arena = new_arena(capacity, quantised, axes)
    index, dist, gate, levels, rot = arena
    first_dist = np.empty(count, dtype=np.float32)
    for i in range(count):
        first_dist[i] = sq_dist(points, i, points, first)
    order = member_order(first_dist, np.arange(count))
    scale = np.zeros(quantised, dtype=np.float32)
    largest = np.float32(0.0)
    for lo in range(0, count, 16384):
        hi = min(lo + 16384, count)
        centred = points[order[lo:hi]] - mean
        rot[lo:hi, :axes] = np.dot(centred, basis)
        for j in range(lo, hi):
            index[j] = order[j]
            dist[j] = first_dist[order[j]]
            rot[j, axes] = np.dot(centred[j - lo], centred[j - lo])
            largest = max(largest, rot[j, axes])
            for q in range(quantised):
                scale[q] = max(scale[q], abs(rot[j, q]))
    for q in range(quantised):
        scale[q] = scale[q] / np.float32(126.0) if scale[q] > 1e-30 else np.float32(1.0)
    largest = largest * np.float32(1.01)
    for j in range(count):
        gate[j] = reach(dist[j], quantise(rot[j], scale, levels[j]), rot[j, axes], largest)
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
            copy(arena, j, used)
            dist[used] = moved_dist[t]
            gate[used] = member_gate(dist[used], levels[used], rot[used], scale, largest)
            used += 1
            t += 1
        else:
            if kept != j:
                copy(arena, j, kept)
            kept += 1
    return kept, used, t
