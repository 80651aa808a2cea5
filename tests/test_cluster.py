"""Beyond one process: launchers, a team tracking server, a killed sweep, resume, determinism.

The same three own-named parts are swept with the basic launcher (local store), the
submitit_local launcher (real subprocess jobs, as SLURM runs them) and, with three more, the
joblib launcher: six parallel writers against the team server as docs/clusters.md sets it up
(MLflow's basic-auth app over PostgreSQL, or sqlite where PostgreSQL is absent; an admin, a
worker who may write runs in one experiment, a reader), the worker's password inside
`tracking.uri`. Every launcher gives the same banks and metrics; nothing is lost on the way
into MLflow; the roles hold; the password is written nowhere. A server restart mid-sweep
loses nothing either.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from helpers.configs import ROOT, compose_config, train_command
from helpers.mlflow_server import artifact_paths, free_port, mlflow_server
from helpers.postgres import postgres_database, skip_reason
from helpers.synthetic import make_category
from patchlab.artifacts.bank import BANK_FILE, UNFINISHED_BANK_FILE, bank_digest
from patchlab.artifacts.run_files import METRICS_FILE
from patchlab.jobs.tracking import config_hash, run_params

NAMES = ("gear", "hinge", "valve")
TEAM_NAMES = (*NAMES, "clip", "nozzle", "spring")  # the first three as in `parts`
ADMIN = ("admin", "admin-pass-7Qv")
WORKER = ("worker", "worker-pass-3Zk")
READER = ("reader", "reader-pass-9Kd")
MODEL = "team_model"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")


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


@dataclass
class Team:
    url: str
    backend: str
    out: Path
    console: str


@contextmanager
def signed_in(user: tuple[str, str]) -> Iterator[None]:
    """MLflow clients in this block authenticate as `user` (MLflow reads the environment)."""
    saved = {key: os.environ.get(key) for key in CREDENTIALS[:2]}
    os.environ.update(dict(zip(CREDENTIALS[:2], user, strict=True)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def auth_config(out: Path) -> Path:
    """Nobody may do anything unless granted; the first start creates the admin."""
    path = out / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{out / 'users.db'}\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # a password hash check per user a minute, not a request
    )
    return path


def set_up_users(url: str) -> None:
    """The admin makes the experiment, the worker (EDIT on it) and the reader (READ)."""
    with signed_in(ADMIN):
        auth = AuthServiceClient(url)
        for name, password in (WORKER, READER):
            auth.create_user(name, password)
        experiment = MlflowClient(url).create_experiment("patchcore")
        auth.grant_user_permission(WORKER[0], "experiment", experiment, "EDIT")
        auth.grant_user_permission(READER[0], "experiment", experiment, "READ")


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    out = tmp_path_factory.mktemp("team")
    for seed, name in enumerate(TEAM_NAMES):  # as `parts` makes them: equal results
        make_category(out / "parts", name, size=32, train=4, good=1, defects=1, seed=seed)
    with ExitStack() as stack:
        backend = f"sqlite:///{out / 'server.db'}"
        if skip_reason() is None:
            backend = stack.enter_context(postgres_database())
        url = stack.enter_context(
            mlflow_server(backend, out / "artifacts", auth_config=auth_config(out))
        )
        set_up_users(url)
        with_password = url.replace("://", f"://{WORKER[0]}:{WORKER[1]}@")
        command = train_command(out / "parts", out, "-m", f"category.name={','.join(TEAM_NAMES)}")
        command += ["data.geometry.resize=32", "data.geometry.crop_size=32"]
        command += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"]
        command += [f"tracking.uri={with_password}", f"tracking.register_model={MODEL}"]
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        yield Team(url, backend, out, done.stdout + done.stderr)


def denied(action) -> int:
    """The HTTP status an MLflow client call was refused with (0: it was allowed)."""
    try:
        action()
    except MlflowException as error:
        return error.get_http_status_code()
    return 0


@pytest.mark.slow
def test_roles_are_enforced_by_a_real_server(team: Team) -> None:
    query = f"{team.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=patchcore"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(query, timeout=30)
    assert anonymous.value.code == 401
    with signed_in(READER):
        reader = MlflowClient(team.url)
        experiment = reader.get_experiment_by_name("patchcore")
        runs = reader.search_runs([experiment.experiment_id])
        assert len(runs) == len(TEAM_NAMES) + 1  # it reads every run
        assert denied(lambda: reader.create_run(experiment.experiment_id)) == 403
        assert denied(lambda: reader.set_registered_model_alias(MODEL, "champion", 1)) == 403
        assert denied(lambda: reader.delete_experiment(experiment.experiment_id)) == 403
    with signed_in(WORKER):
        versions = MlflowClient(team.url).search_model_versions(f"name = '{MODEL}'")
        assert len(versions) == len(TEAM_NAMES)  # the worker registered every job's model


@pytest.mark.slow
def test_the_workers_sweep_logs_everything_and_its_password_nowhere(
    team: Team, basic: Path
) -> None:
    """Six parallel writers lose nothing: each run has what the basic launcher's local run of
    the same part has (params, metric names, artifacts, dataset inputs, bank)."""
    _, reference = runs_by_category(local_store(basic))
    with signed_in(WORKER):
        client = MlflowClient(team.url)
        experiment = client.get_experiment_by_name("patchcore")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if "category" not in r.data.tags]
        jobs = {r.data.tags["category"]: r for r in runs if "category" in r.data.tags}
        assert sorted(jobs) == sorted(TEAM_NAMES)
        assert parent.info.status == "FINISHED", (parent.data.tags, team.console[-3000:])
        assert parent.data.metrics["failed_categories"] == 0
        mean = sum(r.data.metrics["image_auroc"] for r in jobs.values()) / len(jobs)
        assert parent.data.metrics["image_auroc"] == pytest.approx(mean)  # the sweep's row
        summary = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert summary >= {"summary.csv", "summary.md", "summary_bars.png", "summary_heatmap.png"}
        local = reference["gear"]
        for name, run in jobs.items():
            assert run.info.status == "FINISHED", (name, run.data.tags)
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert len(run.data.params) == len(run_params(compose_config()))
            assert set(run.data.params) == set(local.data.params)
            assert set(run.data.metrics) == set(local.data.metrics)
            assert run.data.params["tracking.uri"] == team.url.replace("://", "://worker:***@")
            folder = team.out / "multirun" / name
            files = {
                str(p.relative_to(folder))
                for p in folder.rglob("*")
                # train.log is still being written while it is logged; the bank is the model's
                if p.is_file() and p.name not in ("train.log", BANK_FILE)
            }
            logged = artifact_paths(client, run.info.run_id)
            assert files <= logged
            if name in reference:  # heatmap names follow each part's own defects
                expected = artifact_paths(local_store(basic), reference[name].info.run_id)
                assert logged == expected, name
            assert BANK_FILE not in logged  # uploaded once, inside the logged model
            inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
            assert set(inputs) == {"train", "test"} and '"num_rows": 4' in inputs["train"].profile
            texts = [*run.data.params.values(), *run.data.tags.values()]
            assert not any(WORKER[1] in text for text in texts), name
        for name in NAMES:
            assert jobs[name].data.tags["bank_sha256"] == reference[name].data.tags["bank_sha256"]
    assert any((team.out / "artifacts").rglob(BANK_FILE))
    scores = (team.out / "multirun" / "gear" / "scores.csv").read_text().splitlines()
    assert Path(scores[1].split(",")[0]).is_absolute()
    report = team.out / "report"
    command = [sys.executable, "-m", "patchlab.report", "--sweep", str(team.out / "multirun")]
    command += ["--tracking-uri", team.url.replace("://", f"://{WORKER[0]}:{WORKER[1]}@")]
    started = time.monotonic()
    done = subprocess.run([*command, "--out", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 60, done.stderr[-3000:]  # no request waits on retries
    written = [p for folder in (team.out / "multirun", report) for p in folder.rglob("*")]
    assert len([p for p in written if p.suffix == ".html"]) == 1
    leaks = [p for p in written if p.is_file() and WORKER[1].encode() in p.read_bytes()]
    assert leaks == []
    assert WORKER[1] not in team.console + done.stdout + done.stderr


@pytest.mark.slow
def test_the_sweep_against_postgresql_lost_nothing(team: Team) -> None:
    if not team.backend.startswith("postgresql"):
        pytest.skip(f"ran on sqlite: {skip_reason()}")
    engine = sqlalchemy.create_engine(team.backend)
    with engine.connect() as connection:
        statuses = connection.execute(sqlalchemy.text("select status from runs")).scalars().all()
        params = connection.execute(sqlalchemy.text("select count(*) from params")).scalar()
    engine.dispose()
    assert statuses == ["FINISHED"] * (len(TEAM_NAMES) + 1)
    assert params == len(TEAM_NAMES) * len(run_params(compose_config()))


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
def test_banks_and_metrics_are_identical_on_every_launcher(
    basic: Path, submitit: Path, team: Team
) -> None:
    for name in NAMES:
        expected = result(basic / "multirun" / name)
        assert result(team.out / "multirun" / name) == expected, name  # joblib
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


@pytest.mark.slow
def test_a_tracking_server_restart_mid_sweep_loses_nothing(
    basic: Path, parts: Path, tmp_path
) -> None:
    """The server goes down once the first job has opened its run and comes back on the same
    port some seconds later; MLflow's request retries carry every job across the gap."""
    backend, port = f"sqlite:///{tmp_path / 'server.db'}", free_port()
    command = train_command(parts, tmp_path, "-m", f"category.name={','.join(NAMES)}")
    command += ["data.geometry.resize=32", "data.geometry.crop_size=32"]
    command += [f"tracking.uri=http://127.0.0.1:{port}"]
    with mlflow_server(backend, tmp_path / "artifacts", port=port) as url:
        sweeping = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        for line in sweeping.stdout:
            if "MLflow run " in line:  # the first job's run is open: stop the server now
                break
    time.sleep(5)
    with mlflow_server(backend, tmp_path / "artifacts", port=port) as url:
        log = line + sweeping.communicate(timeout=600)[0]
        assert sweeping.returncode == 0, log[-3000:]
        assert "Job failed" not in log
        client = MlflowClient(url)
        parent, jobs = runs_by_category(client)
        _, reference = runs_by_category(local_store(basic))
        assert parent.info.status == "FINISHED"
        for name, run in jobs.items():
            assert run.info.status == "FINISHED", name
            assert set(run.data.params) == set(reference[name].data.params)
            assert set(run.data.metrics) == set(reference[name].data.metrics)
            logged = artifact_paths(client, run.info.run_id)
            assert logged == artifact_paths(local_store(basic), reference[name].info.run_id)
            assert result(tmp_path / "multirun" / name) == result(basic / "multirun" / name)
