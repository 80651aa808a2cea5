"""Per step: which clusters may lose members, their tails, and the tail members that move.

Each pass first gathers the survivors of the whole step, then reads them with prefetches
several items ahead, so that many cache misses are in flight at once.
"""

import numpy as np
from numba import njit

from patchlab.core.pruned_greedy.bounds import (
    AHEAD,
    MARGIN,
    SLACK,
    dequantised_sq_dist,
    prefetch,
    prefetch_row,
    rotated_sq_dist,
    sq_dist,
)


@njit(cache=True, fastmath=True)
def losing_clusters(
    step: int,
    new_rot: np.ndarray,
    centers: tuple,
    radius: np.ndarray,
    scale: np.ndarray,
    listed: np.ndarray,
    half: np.ndarray,
    estimate: np.ndarray,
) -> int:
    """Lists the clusters a that may lose members to the new center, d(a, new) < 2 r_a, and
    a lower bound of d(a, new)^2 / 4 for each; returns how many.

    First every center on its int8 axes (one byte per axis, axis by axis so that it
    vectorises: this is the O(keep^2) part), then the few left on all float axes.
    """
    center_rot, center_levels, _, center_limit = centers
    axes = len(new_rot) - 1
    estimate[:step] = 0.0
    for q in range(center_levels.shape[0]):
        target = new_rot[q]
        unit = scale[q]
        row = center_levels[q]
        for a in range(step):
            diff = np.float32(row[a]) * unit - target
            estimate[a] += diff * diff
    near = 0
    for a in range(step):
        listed[near] = a
        near += estimate[a] < center_limit[a]
    losing = 0
    for n in range(near):
        if n + AHEAD < near:
            prefetch_row(center_rot, listed[n + AHEAD])
        a = listed[n]
        between = rotated_sq_dist(center_rot, a, new_rot)
        slack = SLACK * (center_rot[a, axes] + new_rot[axes])
        half[losing] = (between - slack) / (4.0 * MARGIN)
        listed[losing] = a
        losing += between < 4.0 * radius[a] * MARGIN + slack
    return losing


@njit(cache=True)
def tails(
    losing: int,
    listed: np.ndarray,
    half: np.ndarray,
    dist: np.ndarray,
    start: np.ndarray,
    sizes: np.ndarray,
    tail: np.ndarray,
) -> int:
    """Each losing cluster's tail, its members beyond d(a, new) / 2 (at its segment's end);
    returns their total, the most members that can move."""
    total = 0
    for n in range(losing):
        if n + AHEAD < losing:
            ahead = listed[n + AHEAD]
            prefetch(dist, start[ahead] + sizes[ahead] - 1)
        a = listed[n]
        lo = start[a] + sizes[a]
        while lo > start[a] and dist[lo - 1] > half[n]:
            lo -= 1
        tail[n] = start[a] + sizes[a] - lo
        total += tail[n]
    return total


@njit(cache=True, fastmath=True)
def quantised_stage(
    new_rot: np.ndarray,
    arena: tuple,
    scale: np.ndarray,
    losing: int,
    listed: np.ndarray,
    tail: np.ndarray,
    start: np.ndarray,
    sizes: np.ndarray,
    found: np.ndarray,
) -> int:
    """Stage 1 over every tail member: int8 axes against its gate. Survivors' slots go to
    `found` in tail order; returns how many."""
    _, _, gate, levels, _ = arena
    quantised = levels.shape[1]
    survivors = 0
    for n in range(losing):
        if n + AHEAD < losing:
            ahead = listed[n + AHEAD]
            end = start[ahead] + sizes[ahead]
            for line in range((end - tail[n + AHEAD]) * quantised, end * quantised, 64):
                prefetch(levels, line)
        end = start[listed[n]] + sizes[listed[n]]
        for j in range(end - tail[n], end):
            close = dequantised_sq_dist(levels[j], new_rot, scale)
            found[survivors] = j
            survivors += close < gate[j]
    return survivors


@njit(cache=True, fastmath=True)
def float_stage(new_rot: np.ndarray, arena: tuple, found: np.ndarray, survivors: int) -> int:
    """Stage 2 over stage 1's survivors: all rotated float axes. Keeps the survivors at the
    front of `found`; returns how many."""
    _, dist, _, _, rot = arena
    axes = len(new_rot) - 1
    closer = 0
    for t in range(survivors):
        if t + AHEAD < survivors:
            prefetch_row(rot, found[t + AHEAD])
        j = found[t]
        close = rotated_sq_dist(rot, j, new_rot)
        found[closer] = j
        closer += close < dist[j] * MARGIN + SLACK * (rot[j, axes] + new_rot[axes])
    return closer


@njit(cache=True, fastmath=True)
def exact_stage(
    points: np.ndarray,
    new: int,
    arena: tuple,
    found: np.ndarray,
    closer: int,
    moved_dist: np.ndarray,
) -> int:
    """Stage 3: the exact distance, as the plain loop measures it. Keeps the movers at the
    front of `found` with their new distances in `moved_dist`; returns how many."""
    index, dist, _, _, _ = arena
    movers = 0
    for t in range(closer):
        if t + AHEAD < closer:
            prefetch_row(points, index[found[t + AHEAD]])
        j = found[t]
        candidate = sq_dist(points, index[j], points, new)
        if candidate < dist[j]:
            found[movers] = j
            moved_dist[movers] = candidate
            movers += 1
    return movers
