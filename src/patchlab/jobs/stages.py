"""Which stage a job is in, and SIGTERM / SIGINT turned into an exception that names it.

SLURM sends SIGTERM before it kills a preempted or timed-out job, and a user presses Ctrl+C.
Either must end the MLflow run as KILLED with its stage, log what was already computed, and
leave no file that looks finished; that needs the stop to arrive as an exception in the main
thread, while the job is working, and not at all while that cleanup runs. Long compiled work
(the coreset selection) asks `check` between its steps.
"""

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# submitit's warning that a SLURM job is about to time out or be preempted. Its own handler
# stays in charge (it requeues the job, or ends it with an error); the warning is only
# remembered, so that whatever submitit raises ends the run as KILLED, not FAILED.
WARNING = signal.SIGUSR2


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
_warned_by: object = None  # the handler that was on WARNING before ours (submitit's)


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


def _on_warning(signal_number: int, frame: FrameType | None) -> None:
    global _received
    if os.getpid() != _owner:
        return  # a forked child: requeueing the job is the parent's to do, once
    if _received is None:
        _received = signal_number
    if callable(_warned_by):
        _warned_by(signal_number, frame)


def catch_stop_signals() -> None:
    """Process-wide, for train.py and the basic launcher's sweep: remember the first stop
    signal (and raise it inside `interruptible`); chain submitit's timeout warning.

    Only the main thread may set handlers; elsewhere (a thread-pool launcher) signals keep
    their default action.
    """
    global _owner, _warned_by
    _owner = os.getpid()
    try:
        for number in SIGNALS:
            signal.signal(number, _on_signal)
        previous = signal.getsignal(WARNING)
        if callable(previous) and previous is not _on_warning:
            _warned_by = previous
            signal.signal(WARNING, _on_warning)
    except ValueError:
        log.debug("not the main thread: stop signals keep their default handlers")


def stop_if_received(stage: str = "before start") -> None:
    """Raises Interrupted if a stop signal came already: a sweep starts no job after one."""
    if _received is not None:
        raise Interrupted(_received, stage)


def check() -> None:
    """The detector's stop callback: raises Interrupted, in the current stage, after a signal."""
    stop_if_received(_stage)


@contextmanager
def interruptible() -> Iterator[None]:
    """Inside, the first stop signal raises Interrupted; one that came before raises now.

    Only the job's own work goes inside: MLflow's calls around it (opening the run, logging
    params, uploading artifacts, the model) hold a signal until they are done, so the run
    is never left RUNNING or half-logged by a stop in the middle of a request.
    """
    global _armed, _stage
    _stage = "setup"
    _armed = True  # before the check: a signal in between raises either way
    try:
        stop_if_received(_stage)
        yield
    finally:
        _armed = False


def stopped_by(error: BaseException) -> Interrupted | None:
    """The stop behind `error`: itself, or, after a signal, whatever it made submitit (or
    Lightning) raise instead; None for an ordinary failure."""
    if isinstance(error, Interrupted):
        return error
    return Interrupted(_received, _stage) if _received is not None else None


@contextmanager
def held() -> Iterator[None]:
    """Inside, a stop signal is only remembered (for an upload at a job's end: the run then
    finishes, and the sweep starts no further job)."""
    global _armed
    was_armed, _armed = _armed, False
    try:
        yield
    finally:
        _armed = was_armed
