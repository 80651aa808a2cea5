"""Faults inside one job: stop signals, what a stopped run leaves behind, and resume's guards."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc  # the module itself: until imported, mlflow.pyfunc is a lazy stand-in
import numba
import pytest
from hydra import compose, initialize_config_dir
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from helpers.configs import ROOT
from patchlab.artifacts.bank import BANK_FILE, UNFINISHED_BANK_FILE
from patchlab.artifacts.run_files import METRICS_FILE, written_atomically
from patchlab.core.stoppable import stoppable
from patchlab.errors import UserError
from patchlab.jobs import pipeline, stages
from patchlab.jobs.resume import finished_run
from patchlab.jobs.sweep import record_failure, record_killed
from patchlab.jobs.tracking import tracked_run
from patchlab.reporting import render
from patchlab.reporting.summary import collect, compare, to_markdown


@pytest.fixture
def stop_signals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """train.py's handlers in this process for one test, then pytest's own back."""
    saved = {number: signal.getsignal(number) for number in stages.SIGNALS}
    monkeypatch.setattr(stages, "_received", None)
    stages.catch_stop_signals()
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def test_a_signal_inside_a_job_raises_with_its_stage_and_a_second_is_held(stop_signals) -> None:
    with pytest.raises(stages.Interrupted) as stopped, stages.interruptible():
        stages.enter("coreset selection")
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.stage == "coreset selection" and stopped.value.exit_code == 143
    os.kill(os.getpid(), signal.SIGINT)  # during cleanup: remembered, not raised
    assert stages.received() == signal.SIGTERM
    # The next job of the sweep does not start.
    with pytest.raises(stages.Interrupted, match="SIGTERM during before start"):
        stages.stop_if_received()
    with pytest.raises(stages.Interrupted), stages.interruptible():
        pytest.fail("a job started after the sweep was stopped")


def test_a_signal_between_jobs_only_stops_the_next_one(stop_signals) -> None:
    os.kill(os.getpid(), signal.SIGINT)
    assert stages.received() == signal.SIGINT
    with pytest.raises(stages.Interrupted) as stopped, stages.interruptible():
        pass
    assert stopped.value.exit_code == 130


def test_a_forked_loader_worker_ignores_the_stop_signal(stop_signals) -> None:
    """Ctrl+C reaches the DataLoader's forked workers too; only the parent may raise."""
    child = os.fork()
    if child == 0:  # the worker: the signal must pass without an exception
        try:
            with stages.interruptible():
                os.kill(os.getpid(), signal.SIGINT)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stages.received() is None


def test_a_signal_during_an_upload_is_held_and_stops_the_next_job(stop_signals) -> None:
    with stages.interruptible():
        stages.enter("writing results")
        with stages.held():  # e.g. the MLflow model's upload at the end of a run
            os.kill(os.getpid(), signal.SIGTERM)
        assert stages.received() == signal.SIGTERM  # remembered, the run goes on and ends
    with pytest.raises(stages.Interrupted, match="before start"):
        stages.stop_if_received()


def test_submitits_timeout_warning_keeps_its_handler_and_the_run_ends_killed(
    cfg: DictConfig, tmp_path: Path, stop_signals
) -> None:
    """USR2 is submitit's: it requeues, or ends the job with an error; that ends KILLED."""
    previous = signal.getsignal(stages.WARNING)

    def submitit_handler(number: int, frame: object) -> None:
        raise RuntimeError("Job not requeued because: timed-out and not checkpointable.")

    signal.signal(stages.WARNING, submitit_handler)
    try:
        stages.catch_stop_signals()
        failing = pytest.raises(RuntimeError, match="not requeued")
        with failing, tracked_run(cfg, tmp_path / "out"), stages.interruptible():
            stages.enter("scoring")
            os.kill(os.getpid(), stages.WARNING)
    finally:
        signal.signal(stages.WARNING, previous)
    client = MlflowClient(f"sqlite:///{Path(cfg.tracking.root) / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("patchcore").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["stage"] == "scoring"
    assert run.data.tags["error"] == "stopped by SIGUSR2 during scoring"


def test_a_signal_during_compiled_coreset_selection_raises_at_once(stop_signals) -> None:
    """The pruned selection is one compiled call of up to minutes; the stop must not wait."""

    @numba.njit(nogil=True)
    def spin(steps: int) -> int:  # like pruned_greedy: long, GIL-free, deaf to signals
        state = 1
        for _ in range(steps):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        return state

    spin(1)  # compiled before the clock starts
    start = time.perf_counter()
    spin(50_000_000)
    steps = int(50_000_000 * 4.0 / max(time.perf_counter() - start, 1e-4))  # about 4 s
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.perf_counter()
    with pytest.raises(stages.Interrupted), stages.interruptible():
        stoppable(spin, stages.check, steps)
    assert time.perf_counter() - start < 2.0


def test_interrupted_run_ends_killed_with_its_stage(cfg: DictConfig, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "partial_result.txt").write_text("computed before the stop")
    with pytest.raises(stages.Interrupted), tracked_run(cfg, out):
        raise stages.Interrupted(signal.SIGTERM, "scoring")
    client = MlflowClient(f"sqlite:///{Path(cfg.tracking.root) / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("patchcore").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["stage"] == "scoring"
    assert run.data.tags["error"] == "stopped by SIGTERM during scoring"
    assert "partial_result.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(run.data.tags["config_hash"]) == 16


def test_a_run_stopped_after_fitting_leaves_nothing_that_looks_finished(
    cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stopped(*args: object) -> None:
        raise stages.Interrupted(signal.SIGTERM, stages.current())

    monkeypatch.setattr(render, "render_run", stopped)  # imported by the pipeline when drawing
    with open_dict(cfg):
        cfg.tracking.enabled = False
    with pytest.raises(stages.Interrupted, match="during writing results"):
        pipeline.run(cfg, tmp_path)
    assert (tmp_path / UNFINISHED_BANK_FILE).is_file()
    assert not (tmp_path / BANK_FILE).exists() and not (tmp_path / METRICS_FILE).exists()
    assert not list(tmp_path.glob(".*.partial"))


def test_a_stop_during_the_model_upload_lets_the_finished_run_finish(
    cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_signals
) -> None:
    def upload(**kwargs: object) -> SimpleNamespace:
        os.kill(os.getpid(), signal.SIGTERM)
        return SimpleNamespace(model_uri="models:/m-0")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", upload)
    out = tmp_path / "out"
    with tracked_run(cfg, out) as run_log, stages.interruptible():
        pipeline.run(cfg, out, run_log)
    assert (out / METRICS_FILE).is_file() and (out / BANK_FILE).is_file()
    assert stages.received() == signal.SIGTERM  # and the sweep starts no further job
    client = MlflowClient(f"sqlite:///{Path(cfg.tracking.root) / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("patchcore").experiment_id])
    assert run.info.status == "FINISHED"


def test_a_write_cut_short_leaves_no_file_under_the_real_name(tmp_path: Path) -> None:
    target = tmp_path / METRICS_FILE
    with pytest.raises(stages.Interrupted), written_atomically(target) as partial:
        partial.write_text('{"image_auroc": 0.9')
        raise stages.Interrupted(signal.SIGTERM, "writing results")
    assert list(tmp_path.iterdir()) == []
    with written_atomically(target) as partial:
        partial.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]


def test_summary_lists_killed_and_resumed_jobs(tmp_path: Path) -> None:
    (tmp_path / "gear").mkdir()
    (tmp_path / "gear" / METRICS_FILE).write_text('{"image_auroc": 1.0}')
    (tmp_path / "gear" / "resumed.json").write_text('{"run_id": "abc123"}')
    record_killed(tmp_path / "hinge", stages.Interrupted(signal.SIGTERM, "coreset selection"))
    markdown = to_markdown(compare(collect(tmp_path)))
    assert "| gear | ok | 1.0000 |" in markdown and "| hinge | KILLED | - |" in markdown
    assert "**hinge KILLED**: stopped by SIGTERM during coreset selection" in markdown
    assert "**gear resumed**: finished run abc123" in markdown
    assert "| mean | 1/2 ok |" in markdown


def test_a_job_that_fails_after_its_metrics_is_failed_with_its_numbers(tmp_path: Path) -> None:
    """An upload that fails at the end of a job leaves metrics.json: the job still failed."""
    (tmp_path / "gear").mkdir()
    (tmp_path / "gear" / METRICS_FILE).write_text('{"image_auroc": 0.9}')
    record_failure(tmp_path / "gear", MlflowException("upload of train.log failed"))
    table = collect(tmp_path)
    markdown = to_markdown(compare(table))
    assert "| gear | FAILED | 0.9000 |" in markdown
    assert "**gear FAILED**: MlflowException: upload of train.log failed" in markdown


def test_resume_without_tracking_says_why(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.tracking.enabled = False
    with pytest.raises(UserError, match="resume=true looks for finished runs in MLflow"):
        finished_run(cfg)


def test_slurm_preset_extends_submitits_slurm_launcher() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.cpus_per_task, launcher.gpus_per_node, launcher.mem_gb) == (8, 1, 32)
    assert (launcher.timeout_min, launcher.array_parallelism) == (60, 15)
    assert launcher.partition is None and launcher.submitit_folder.endswith(".submitit/%j")
