"""Drawing in a forked process beside this one: results, failures and stops cross back."""

import multiprocessing
import os
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
    assert "in broken" in caught.value.__notes__[0]


def test_a_process_that_dies_without_a_word_is_reported() -> None:
    with pytest.raises(DrawingFailed, match=r"died \(exit code 3\)"):
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


def test_without_fork_both_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert beside(os.getpid, os.getpid) == (os.getpid(), os.getpid())
