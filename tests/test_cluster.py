"""Beyond one process: launchers, a team tracking server, a killed sweep, resume, determinism.

The same three own-named parts are swept with the basic launcher (local store), the joblib
launcher (3 parallel writers against a real `mlflow server` with proxied artifacts) and the
submitit_local launcher (real subprocess jobs, as SLURM runs them); all three must give the
same banks and metrics, and lose nothing on the way into MLflow.
"""

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from helpers.configs import ROOT, compose_config, train_command
from helpers.mlflow_server import artifact_paths, mlflow_server
from helpers.synthetic import make_category
from patchlab.artifacts.bank import BANK_FILE, UNFINISHED_BANK_FILE, bank_digest
from patchlab.artifacts.run_files import METRICS_FILE
from patchlab.jobs.tracking import config_hash, run_params

NAMES = ("gear", "hinge", "valve")
# What may differ between two runs of one config: wall-clock time and memory.
MACHINE_METRICS = {"fit_seconds", "test_seconds", "peak_rss_mb"}


def sweep(root: Path, out: Path, *args: str) -> Path:
    """train.py -m over NAMES, as the docs run it; returns the sweep dir."""
    command = train_command(root, out, "-m", f"category.name={','.join(NAMES)}", *args)
    command += ["data.geometry.resize=32", "data.geometry.crop_size=32"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "multirun"


def local_store(out: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")


def runs_by_category(client: MlflowClient) -> tuple[object, dict[str, object]]:
    """The sweep's parent run and its jobs' runs by category (one run each)."""
    experiment = client.get_experiment_by_name("patchcore")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "category" not in r.data.tags]
    jobs = {r.data.tags["category"]: r for r in runs if "category" in r.data.tags}
    assert sorted(jobs) == sorted(NAMES) and len(runs) == len(NAMES) + 1
    return parent, jobs


def result(job_dir: Path) -> tuple[str, dict[str, float]]:
    """The job's bank digest and its metrics less the machine-dependent ones."""
    banks = load_file(str(job_dir / BANK_FILE))
    metrics = json.loads((job_dir / METRICS_FILE).read_text())
    digest = bank_digest([banks[key] for key in sorted(banks)])
    return digest, {k: v for k, v in metrics.items() if k not in MACHINE_METRICS}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    for seed, name in enumerate(NAMES):
        make_category(root, name, size=32, train=4, good=1, defects=1, seed=seed)
    return root


@pytest.fixture(scope="module")
def basic(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("basic")
    sweep(parts, out)
    return out


@pytest.fixture(scope="module")
def submitit(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("submitit")
    sweep(parts, out, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    return out


@pytest.fixture(scope="module")
def served(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The documented team server (database store, proxied artifacts) and a 3-job parallel
    sweep against it; the server stays up for the module's checks."""
    out = tmp_path_factory.mktemp("served")
    backend = f"sqlite:///{out / 'server.db'}"
    with mlflow_server(backend, out / "artifacts") as url:
        args = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=3", f"tracking.uri={url}")
        sweep(parts, out, *args)
        yield out, url


@pytest.mark.slow
def test_submitit_local_sweep_matches_the_basic_launcher(basic: Path, submitit: Path) -> None:
    parent, jobs = runs_by_category(local_store(submitit))
    assert all(run.info.status == "FINISHED" for run in jobs.values())
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_categories"] == 0
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in jobs.values())
    summary = (submitit / "multirun" / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in NAMES)
    assert any((submitit / "multirun" / ".submitit").rglob("*_log.out"))  # real submitit jobs
    for name in NAMES:
        assert result(submitit / "multirun" / name) == result(basic / "multirun" / name), name


@pytest.mark.slow
def test_parallel_writers_against_a_team_server_lose_nothing(
    basic: Path, served: tuple[Path, str]
) -> None:
    out, url = served
    client = MlflowClient(url)
    parent, jobs = runs_by_category(client)
    basic_store = local_store(basic)
    _, reference = runs_by_category(basic_store)
    for name, run in jobs.items():
        local = reference[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name.startswith(f"{name} resnet18 r0.25")
        assert len(run.data.params) == len(local.data.params) == len(run_params(compose_config()))
        assert set(run.data.params) == set(local.data.params)
        assert set(run.data.metrics) == set(local.data.metrics)
        assert run.data.tags["bank_sha256"] == local.data.tags["bank_sha256"]
        files = {
            str(p.relative_to(out / "multirun" / name))
            for p in (out / "multirun" / name).rglob("*")
            # train.log is still being written while it is logged; the bank is the model's
            if p.is_file() and p.name not in ("train.log", BANK_FILE)
        }
        logged = artifact_paths(client, run.info.run_id)
        assert files <= logged and logged == artifact_paths(basic_store, local.info.run_id)
        assert BANK_FILE not in logged  # uploaded once, inside the logged model
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "test"} and '"num_rows": 4' in inputs["train"].profile
    experiment = client.get_experiment_by_name("patchcore")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    assert any((out / "artifacts").rglob(BANK_FILE))
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_categories"] == 0
    mean = sum(r.data.metrics["image_auroc"] for r in jobs.values()) / len(jobs)
    assert parent.data.metrics["image_auroc"] == pytest.approx(mean)  # the sweep's row: means
    summary = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert summary >= {"summary.csv", "summary.md", "summary_bars.png", "summary_heatmap.png"}
    scores = (out / "multirun" / "gear" / "scores.csv").read_text().splitlines()
    assert Path(scores[1].split(",")[0]).is_absolute()


@pytest.mark.slow
def test_banks_and_metrics_are_identical_on_every_launcher(
    basic: Path, submitit: Path, served: tuple[Path, str]
) -> None:
    for name in NAMES:
        expected = result(basic / "multirun" / name)
        assert result(served[0] / "multirun" / name) == expected, name
        assert result(submitit / "multirun" / name) == expected, name
    _, tagged = runs_by_category(local_store(basic))
    assert tagged["gear"].data.tags["bank_sha256"] == result(basic / "multirun" / "gear")[0]


def test_config_hash_ignores_what_cannot_change_a_result() -> None:
    base = config_hash(compose_config())
    assert config_hash(compose_config(["data.num_workers=2", "tracking.uri=http://x:1"])) == base
    assert config_hash(compose_config(["resume=true"])) == base
    assert config_hash(compose_config(["model.coreset_ratio=0.5"])) != base
    tuned = ["threshold=optuna"]  # its study storage interpolates tracking.root
    tuned_hash = config_hash(compose_config([*tuned, "tracking.root=/a"]))
    assert config_hash(compose_config([*tuned, "tracking.root=/b"])) == tuned_hash != base
    assert config_hash(compose_config(["category.name=gear"])) != base


@pytest.mark.slow
def test_sigterm_in_coreset_selection_kills_the_run_and_resume_reruns_only_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "parts"
    make_category(root, "gear", size=32, train=4, good=1, defects=1, seed=0)
    # Large enough that its coreset selection takes seconds: the signal lands inside it.
    make_category(root, "hinge", size=160, train=120, good=1, defects=1, seed=1)
    command = train_command(root, tmp_path, "-m", "category.name=gear,hinge")
    command += ["data.geometry.resize=160", "data.geometry.crop_size=160"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    selections = 0
    for line in process.stdout:
        selections += "Stage: coreset selection" in line
        if selections == 2:  # gear's, then hinge's
            process.send_signal(signal.SIGTERM)
            break
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    hinge = tmp_path / "multirun" / "hinge"
    assert not (hinge / METRICS_FILE).exists() and not (hinge / BANK_FILE).exists()
    assert not list(hinge.glob(".*.partial"))
    assert json.loads((hinge / "killed.json").read_text())["stage"] == "coreset selection"
    summary = (tmp_path / "multirun" / "summary.md").read_text()
    assert "**hinge KILLED**: stopped by SIGTERM during coreset selection" in summary
    assert "| gear | ok |" in summary
    client = local_store(tmp_path)
    experiment = client.get_experiment_by_name("patchcore").experiment_id
    runs = client.search_runs([experiment])
    status = {r.data.tags.get("category", "sweep"): r.info.status for r in runs}
    assert status == {"gear": "FINISHED", "hinge": "KILLED", "sweep": "KILLED"}
    killed = next(r for r in runs if r.data.tags.get("category") == "hinge")
    assert killed.data.tags["stage"] == "coreset selection"
    assert "bank_size" not in killed.data.metrics

    rerun = [arg for arg in command if not arg.startswith("hydra.sweep.dir=")]
    rerun += [f"hydra.sweep.dir={tmp_path}/rerun", "resume=true"]
    again = subprocess.run(rerun, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    jobs = [(r.data.tags["category"], r.info.status) for r in runs if "category" in r.data.tags]
    assert jobs == [("gear", "FINISHED"), ("hinge", "KILLED"), ("hinge", "FINISHED")]
    summary = (tmp_path / "rerun" / "summary.md").read_text()
    assert "| gear | ok |" in summary and "| hinge | ok |" in summary
    assert "**gear resumed**" in summary
    assert (tmp_path / "rerun" / "hinge" / BANK_FILE).is_file()
    assert not (tmp_path / "rerun" / "hinge" / UNFINISHED_BANK_FILE).exists()
