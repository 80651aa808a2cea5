"""Handing freed heap memory back to the OS between the stages of a run.

glibc keeps freed memory in its heap for reuse, so a stage's temporaries stay resident into
the next stage and add to the run's peak. Elsewhere (macOS, musl) these do nothing.
"""

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@cache  # find_library runs ldconfig
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Returns the heap's free pages to the OS: after feature extraction, the batches'
    activations (about 50 MB on bottle), before the coreset allocates its own."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Trims the heap, and makes glibc hand back every later freed buffer of 1 MiB or more.

    By default glibc raises its mmap threshold after each free, up to 32 MiB, so the 16 MB
    per-pixel buffers of metrics and figures come from the heap, whose freed holes stay
    resident: on bottle that added about 250 MB of peak RSS. Called after the test pass: a
    fixed threshold from the start would make every batch buffer a fresh zero-filled mapping,
    which cost 4 s of fit and 2.5 s of test on bottle.
    """
    trim_heap()
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
