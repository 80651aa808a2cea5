"""The lower bounds the pruned loop tests before an exact distance, and their margins.

Each bound is a lower bound of the exact distance with a margin for float32 rounding (MARGIN,
SLACK) and, for the int8 axes, for each vector's own quantisation error, so a bound only ever
skips what the exact distance would skip too.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# float32 sums are off by a few ulps of the magnitudes involved; a bound rules something out
# only beyond these margins.
MARGIN = np.float32(1.001)
SLACK = np.float32(1e-5)
QUANTISED_AXES = 16
BOUND_AXES = 48
AHEAD = 8  # prefetch distance, in items of the list being read


def bound_basis(
    points: np.ndarray, dims: int = BOUND_AXES, sample: int = 20_000
) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the top `dims` principal axes, (D,) and (D, dims), of a row sample.

    The axes only decide what is measured exactly, so any orthonormal basis keeps the
    selection exact; the principal ones make the bounds tight (16 of bottle's 128 projected
    axes hold 91% of its variance, 48 hold 98.6%).
    """
    rows = points[:: max(1, len(points) // sample)].astype(np.float64)
    mean = rows.mean(0)
    rows -= mean
    _, axes = np.linalg.eigh(rows.T @ rows)
    top = axes[:, ::-1][:, :dims]
    return mean.astype(np.float32), np.ascontiguousarray(top, dtype=np.float32)


@intrinsic
def prefetch(typingctx, array, index):  # numba's intrinsic signature, untyped
    """Asks the CPU to start loading the cache line of `array.flat[index]` (no fault, no wait)."""

    def codegen(context, builder, signature, args):
        base = context.make_array(signature.args[0])(context, builder, args[0]).data
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        offset = builder.mul(args[1], ir.Constant(ir.IntType(64), itemsize))
        address = builder.add(builder.ptrtoint(base, ir.IntType(64)), offset)
        pointer = builder.inttoptr(address, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        read, all_levels, data_cache = (ir.Constant(i32, value) for value in (0, 3, 1))
        builder.call(function, [pointer, read, all_levels, data_cache])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(cache=True)
def prefetch_row(array: np.ndarray, row: int) -> None:
    """Prefetches every cache line of one row of a 2-D float32 array (16 items a line)."""
    width = array.shape[1]
    for line in range(0, width, 16):
        prefetch(array, row * width + line)


@njit(cache=True, fastmath=True)
def rotated_sq_dist(rows: np.ndarray, j: int, new_rot: np.ndarray) -> float:
    """Squared distance of row j to the new center over the rotated axes (the last column of
    both is the squared distance from the mean, not an axis)."""
    total = np.float32(0.0)
    for q in range(len(new_rot) - 1):
        diff = rows[j, q] - new_rot[q]
        total += diff * diff
    return total


@njit(cache=True, fastmath=True)
def sq_dist(x: np.ndarray, i: int, y: np.ndarray, j: int) -> float:
    total = np.float32(0.0)
    for k in range(x.shape[1]):
        diff = x[i, k] - y[j, k]
        total += diff * diff
    return total


@njit(cache=True, fastmath=True)
def dequantised_sq_dist(levels: np.ndarray, rot: np.ndarray, scale: np.ndarray) -> float:
    """Squared distance between int8 `levels` (times `scale`) and the first float axes of
    `rot`: a vector's quantisation error, or stage 1's estimate against the new center."""
    err = np.float32(0.0)
    for q in range(len(scale)):
        diff = np.float32(levels[q]) * scale[q] - rot[q]
        err += diff * diff
    return err


@njit(cache=True, fastmath=True)
def quantise(rot: np.ndarray, scale: np.ndarray, out: np.ndarray) -> float:
    """Writes the first axes of `rot` as int8 levels into `out`; returns the squared
    quantisation error."""
    for q in range(len(scale)):
        out[q] = np.int8(min(max(np.round(rot[q] / scale[q]), -127.0), 127.0))
    return dequantised_sq_dist(out, rot, scale)


@njit(cache=True, fastmath=True)
def reach(distance: float, err: float, norm: float, largest: float) -> float:
    """The quantised squared estimate at or beyond which the true distance is >= `distance`
    (squared): a vector's int8 levels are off by at most sqrt(err) from its float axes.

    `norm` and `largest` are squared distances from the mean in all dimensions (this vector's
    and the largest of any): the float32 rounding of the rotation and of the sums is relative
    to them, so the slack covers it however little of the data the axes hold.
    """
    if distance <= 0.0:
        return np.float32(-1.0)
    bound = (np.sqrt(distance) + np.sqrt(err)) * MARGIN
    return bound * bound + SLACK * (norm + largest)


@njit(cache=True, fastmath=True)
def member_gate(
    dist: float, levels: np.ndarray, rot: np.ndarray, scale: np.ndarray, largest: float
) -> float:
    """A member's stage-1 limit: quantised estimates at or beyond it cannot beat `dist`.
    `rot` is its arena row: rotated axes, then its squared distance from the mean."""
    return reach(dist, dequantised_sq_dist(levels, rot, scale), rot[len(rot) - 1], largest)
