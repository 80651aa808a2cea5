"""Long computations that a signal can abandon: the `stop` callback the job layer passes in."""

import threading
from collections.abc import Callable

import numpy as np

Stop = Callable[[], None]  # raises to abandon a long computation; returns to let it go on
STOP_POLL_SECONDS = 0.1


def stoppable(compiled: Callable[..., np.ndarray], stop: Stop | None, *args: object) -> np.ndarray:
    """Runs GIL-free compiled code; with `stop`, in a worker thread, asking `stop` in between.

    A compiled call of a minute cannot look at Python state. Run beside the waiting thread,
    it can be abandoned: when `stop` raises, the raise reaches the caller at once, and the
    abandoned worker computes on (one core) until its loop ends or the process exits.
    """
    if stop is None:
        return compiled(*args)
    result: list[np.ndarray] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(compiled(*args))
        except BaseException as error:  # handed to the waiting thread, which raises it
            failure.append(error)

    thread = threading.Thread(target=work, name="pruned-greedy", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(STOP_POLL_SECONDS)
        stop()
    if failure:
        raise failure[0]
    return result[0]
