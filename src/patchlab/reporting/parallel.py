"""Two pieces of drawing at once: one in a forked copy of this process, one here.

matplotlib holds the GIL while it lays out and rasterises, so threads draw no faster than one
(measured: slower). A forked child needs nothing pickled (it starts with the run's outputs in
memory, pages shared until written) and returns only its file paths. On bottle this drew a
run's 13 figures in 1.2 s instead of 1.9 s on two cores.
"""

import multiprocessing
import traceback
from collections.abc import Callable
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


class DrawingFailed(RuntimeError):
    """The child's error, as text: its exception does not cross the process boundary."""


def beside(apart: Callable[[], A], here: Callable[[], B]) -> tuple[A, B]:
    """Returns (apart(), here()), with `apart` run in a forked child while `here` runs.

    Where fork is missing (Windows, macOS's spawn default aside) both run here, in turn. A
    failure in the child is raised here as DrawingFailed, with its traceback as a note; a stop
    (Ctrl+C, SIGTERM) or a failure here ends the child before it propagates.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return apart(), here()
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(apart, sender), name="patchlab-figures", daemon=True
    )
    child.start()
    sender.close()
    try:
        here_result = here()
        status, payload = receiver.recv()
    except EOFError:  # it ended without a word: killed, or out of memory
        child.join()
        raise DrawingFailed(f"the figure process died (exit code {child.exitcode})") from None
    finally:  # the child has sent its result, or is to stop drawing
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if status == "failed":
        message, trace = payload
        error = DrawingFailed(message)
        error.add_note(f"in the figure process:\n{trace}")
        raise error
    return payload, here_result


def _child(work: Callable[[], A], sender) -> None:
    """Ends in multiprocessing's os._exit: the parent's atexit handlers (its MLflow run's end)
    are not the child's to run."""
    import torch

    torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork (as in loaders)
    try:
        result = ("done", work())
    except BaseException as error:  # anything: the parent must hear of it, not wait
        result = ("failed", (f"{type(error).__name__}: {error}", traceback.format_exc()))
    sender.send(result)
    sender.close()
