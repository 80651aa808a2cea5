"""Drawing in a forked process beside this one: results, failures and stops cross back."""

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from patchlab.reporting.parallel import DrawingFailed, beside


def test_the_work_apart_runs_in_another_process() -> None:
    apart, here = beside(os.getpid, os.getpid)
    assert here == os.getpid() and apart != here


def test_a_failure_apart_is_raised_here_with_its_traceback() -> None:
    def broken() -> None:
        raise ValueError("cannot decode a.png")

    with pytest.raises(DrawingFailed) as caught:
        beside(broken, lambda: None)
    assert str(caught.value) == "ValueError: cannot decode a.png"  # the one line a job prints
    assert "in broken" in str(caught.value.__cause__)


def test_a_process_that_dies_without_a_word_is_reported() -> None:
    with pytest.raises(DrawingFailed, match="the figure process exited with code 3"):
        beside(lambda: os._exit(3), lambda: None)


def test_a_failure_here_stops_the_work_apart(tmp_path: Path) -> None:
    finished = tmp_path / "finished"

    def slow() -> None:
        time.sleep(20)
        finished.write_text("drawn")

    def broken() -> None:
        raise KeyError("here")

    start = time.monotonic()
    with pytest.raises(KeyError):
        beside(slow, broken)
    assert time.monotonic() - start < 10
    assert not multiprocessing.active_children()
    assert not finished.exists()


def test_a_failure_here_is_raised_as_itself(tmp_path: Path) -> None:
    """Even an EOFError: only the pipe's own end means the child died."""

    def broken() -> None:
        raise EOFError("truncated file")

    with pytest.raises(EOFError, match="truncated file"):
        beside(lambda: time.sleep(20), broken)
    assert not multiprocessing.active_children()


def test_a_killed_child_is_named_by_its_signal() -> None:
    with pytest.raises(DrawingFailed, match="was killed by SIGKILL"):
        beside(lambda: os.kill(os.getpid(), signal.SIGKILL), lambda: None)


def test_off_linux_both_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert beside(os.getpid, os.getpid) == (os.getpid(), os.getpid())


def test_the_child_leaves_ctrl_c_and_slurms_warning_to_the_parent() -> None:
    """SIGINT and SIGUSR2 reach the whole process group: the child keeps drawing (the parent
    kills it if it stops), and never runs submitit's requeue a second time."""

    def signalled() -> str:
        for number in (signal.SIGINT, signal.SIGUSR2):
            os.kill(os.getpid(), number)
        return "drawn"

    assert beside(signalled, lambda: None) == ("drawn", None)
