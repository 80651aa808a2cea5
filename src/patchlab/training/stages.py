"""Which stage a job is in, and SIGTERM / SIGINT turned into an exception that names it.

SLURM sends SIGTERM before it kills a preempted or timed-out job, and a user presses Ctrl+C.
Either must end the MLflow run as KILLED with its stage, log what was already computed, and
leave no file that looks finished; that needs the stop to arrive as an exception in the main
thread, while the job is working, and not at all while that cleanup runs.

No Lightning here: MLflow glue and the reading tools import this module.
"""

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop request. Not an Exception, so no `except Exception` (a sweep's failure recording,
    Hydra's error report) can swallow it and carry on."""

    def __init__(self, signal_number: int, stage: str) -> None:
        self.signal_name = signal.Signals(signal_number).name
        self.stage = stage
        self.exit_code = 128 + signal_number  # what a shell reports for a process killed by it
        super().__init__(f"stopped by {self.signal_name} during {stage}")


_stage = "setup"
_received: int | None = None  # the first stop signal this process got
_armed = False  # raise on a signal (inside a job's work) or only remember it
_owner: int | None = None  # the process that set the handlers


def enter(stage: str) -> None:
    """Marks the start of a stage; the log line is what an operator (or a test) waits for."""
    global _stage
    _stage = stage
    log.info("Stage: %s", stage)


def current() -> str:
    return _stage


def received() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _received


def _on_signal(signal_number: int, frame: FrameType | None) -> None:
    global _received, _armed
    if os.getpid() != _owner:
        # A forked child (a DataLoader worker) inherits the handler. Ctrl+C reaches the whole
        # process group: the parent stops and shuts its workers down, and a worker whose
        # parent dies outright exits on its own; raising here would only print tracebacks.
        return
    if _received is not None:
        return  # a second signal: let the first one's cleanup finish
    _received = signal_number
    if _armed:
        _armed = False
        raise Interrupted(signal_number, _stage)
    log.warning("%s received: no further job starts", signal.Signals(signal_number).name)


def catch_stop_signals() -> None:
    """Process-wide, for train.py and the sweep's controller: remember the first stop signal.

    Only the main thread may set handlers; elsewhere (a thread-pool launcher) signals keep
    their default action.
    """
    global _owner
    _owner = os.getpid()
    try:
        for number in SIGNALS:
            signal.signal(number, _on_signal)
    except ValueError:
        log.debug("not the main thread: stop signals keep their default handlers")


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside, the first stop signal raises Interrupted; a signal that came before raises now."""
    global _armed, _stage
    _stage = "setup"
    if _received is not None:
        raise Interrupted(_received, "not started")
    _armed = True
    try:
        yield
    finally:
        _armed = False
