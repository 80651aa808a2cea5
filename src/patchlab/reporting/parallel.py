"""Two pieces of drawing at once: one in a forked copy of this process, one here.

matplotlib holds the GIL while it lays out and rasterises, so threads draw no faster than one
(measured: slower). A forked child needs nothing pickled (it starts with the run's outputs in
memory, pages shared until written) and returns only its file paths. On bottle this drew a
run's 13 figures in 1.2 s instead of 1.9 s on two cores.
"""

import gc
import multiprocessing
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


class DrawingFailed(RuntimeError):
    """The child's error, as text: its exception does not cross the process boundary."""


class ChildTraceback(Exception):
    """The child's traceback, as the cause of its DrawingFailed (what a log prints)."""


def beside(apart: Callable[[], A], here: Callable[[], B]) -> tuple[A, B]:
    """Returns (apart(), here()), with `apart` run in a forked child while `here` runs.

    Only on Linux: macOS forks, but a child forked after Apple's frameworks were used can
    crash, and Windows cannot; there (and when a fork fails) both run here, in turn. A failure
    in the child is raised here as DrawingFailed, caused by its traceback; a failure or a stop
    here kills the child before it propagates.
    """
    if sys.platform != "linux":
        return apart(), here()
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(apart, sender), name="patchlab-figures")
    try:
        try:
            child.start()
        except OSError:  # no memory to fork (strict overcommit): draw in turn
            return apart(), here()
        finally:
            sender.close()
        here_result = here()
        try:
            status, payload = receiver.recv()
        except EOFError:  # it ended without a word
            child.join()
            raise DrawingFailed(f"the figure process {_ended(child.exitcode)}") from None
    finally:  # the child has sent its result, or is to stop drawing
        if child.is_alive():
            child.kill()
        if child.pid is not None:
            child.join()
        receiver.close()
    if status == "failed":
        message, trace = payload
        raise DrawingFailed(message) from ChildTraceback(f"in the figure process:\n{trace}")
    return payload, here_result


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name} (out of memory?)"
    return f"exited with code {code}"


def _child(work: Callable[[], A], sender: Connection) -> None:
    """Ends in multiprocessing's os._exit: the parent's atexit handlers (its MLflow run's end)
    are not the child's to run. Stop signals are the parent's to act on: it kills the child."""
    import torch

    for number in (signal.SIGINT, signal.SIGUSR2):  # Ctrl+C, SLURM's warning (submitit)
        signal.signal(number, signal.SIG_IGN)
    gc.freeze()  # what it inherited: its collections walk only what it draws
    torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork (as in loaders)
    try:
        sender.send(("done", work()))
    except BaseException as error:  # anything: the parent must hear of it, not wait
        sender.send(("failed", (f"{type(error).__name__}: {error}", traceback.format_exc())))
    sender.close()
