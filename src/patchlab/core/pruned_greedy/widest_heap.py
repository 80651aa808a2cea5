"""An indexed max-heap of clusters by radius, for the pruned greedy coreset (numba).

The greedy step needs the cluster whose farthest member is farthest from every center; a
scan over all clusters per step would cost O(keep^2) in total. Radii only shrink, and a new
cluster is pushed once, so sift-down on change and sift-up on insertion keep the top exact
in O(log keep). Among equal radii the lower farthest-member index wins, as the plain loop's
argmax takes the lowest index.
"""

import numpy as np
from numba import njit


@njit(cache=True)
def _before(a: int, b: int, radius: np.ndarray, farthest: np.ndarray) -> bool:
    return radius[a] > radius[b] or (radius[a] == radius[b] and farthest[a] < farthest[b])


@njit(cache=True)
def sift_up(
    heap: np.ndarray, place: np.ndarray, i: int, radius: np.ndarray, farthest: np.ndarray
) -> None:
    """Moves heap[i] up to its place after it was appended; `place[c]` is c's heap slot."""
    item = heap[i]
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(item, heap[parent], radius, farthest):
            break
        heap[i] = heap[parent]
        place[heap[i]] = i
        i = parent
    heap[i] = item
    place[item] = i


@njit(cache=True)
def sift_down(
    heap: np.ndarray,
    place: np.ndarray,
    i: int,
    size: int,
    radius: np.ndarray,
    farthest: np.ndarray,
) -> None:
    """Moves heap[i] down to its place after its radius shrank."""
    item = heap[i]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and _before(heap[child + 1], heap[child], radius, farthest):
            child += 1
        if not _before(heap[child], item, radius, farthest):
            break
        heap[i] = heap[child]
        place[heap[i]] = i
        i = child
    heap[i] = item
    place[item] = i
