"""User errors read as one message with its fix; the full trace only with HYDRA_FULL_ERROR=1."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from helpers.configs import ROOT, compose_config, train_command
from patchlab.errors import UserError, exit_on_user_error
from patchlab.jobs.pipeline import run

# MLflow logs these to stderr once, when a run creates its store; they are not the error.
MLFLOW_STORE_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.store")


def test_build_raises_the_constructors_message_not_hydras(synthetic_root, tmp_path) -> None:
    config = compose_config([f"data.root={synthetic_root}", "backbone.name=nonexistent"])
    with pytest.raises(UserError, match=r"^Unknown backbone.name 'nonexistent'") as info:
        run(config, tmp_path)
    assert isinstance(info.value.__cause__, InstantiationException)


def test_a_missing_category_is_a_user_error(synthetic_root, tmp_path) -> None:
    config = compose_config([f"data.root={synthetic_root}", "category.name=nothing_here"])
    with pytest.raises(UserError, match="nothing_here does not exist") as info:
        run(config, tmp_path)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_exit_on_user_error_prints_two_lines(capsys, monkeypatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @exit_on_user_error
    def main() -> None:
        raise UserError("data.root /x does not exist. Point data.root at a copy.")

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "Error: data.root /x does not exist. Point data.root at a copy.",
        "Set HYDRA_FULL_ERROR=1 for the full traceback.",
    ]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError):
        main()


def train(
    root: Path, tmp_path: Path, *overrides: str, full_error: bool = False, offline: bool = False
) -> tuple[int, list[str]]:
    """train.py as a user runs it; returns its exit status and stderr's lines that matter."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    if offline:  # what huggingface_hub does without a network, at once and on any machine
        env["HF_HUB_OFFLINE"] = "1"
    command = [*train_command(root, tmp_path), f"tracking.root={tmp_path}/mlruns", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not MLFLOW_STORE_LOG.match(line)
    ]
    return result.returncode, lines


def assert_one_message(status: int, lines: list[str], message: str) -> None:
    assert status == 1, lines
    assert len(lines) == 2 and lines[1] == "Set HYDRA_FULL_ERROR=1 for the full traceback.", lines
    assert re.match(f"Error: .*{message}", lines[0]), lines


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("category.name=nothing_here", "Category folder .*nothing_here does not exist"),
        ("backbone.name=nonexistent", "Unknown backbone.name 'nonexistent'.*list_models"),
        ("model.coreset_ratio=1.5", "coreset_ratio must be > 0 and <= 1"),
    ],
)
def test_train_py_prints_one_message(synthetic_root, tmp_path, override, message) -> None:
    assert_one_message(*train(synthetic_root, tmp_path, override), message)


@pytest.mark.slow
def test_train_py_offline_hub_names_the_offline_backbone(synthetic_root, tmp_path) -> None:
    status, lines = train(
        synthetic_root,
        tmp_path,
        "backbone=efficientnet_b5",
        "backbone.pretrained=true",
        offline=True,
    )
    assert_one_message(status, lines, "efficientnet_b5 .*backbone=efficientnet_lite2 data.root=")


@pytest.mark.slow
def test_hydra_full_error_keeps_the_traceback(synthetic_root, tmp_path) -> None:
    status, lines = train(synthetic_root, tmp_path, "model.coreset_ratio=0", full_error=True)
    assert status == 1 and "Traceback (most recent call last):" in lines
    assert lines[-1].startswith("patchlab.errors.UserError: ") and "coreset_ratio" in lines[-1]


@pytest.mark.parametrize("entry", [["train.py"], ["-m", "patchlab.cli", "train"]])
def test_a_group_typo_names_the_close_option_and_own_folders(entry: list[str]) -> None:
    """Before Hydra and before any heavy import: one message, no search path, no option list."""
    command = [sys.executable, *entry, "-m", "category=bottle,botle", "threshold=optuna"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    first, *rest = done.stderr.strip().splitlines()
    assert first == (
        "Error: category=botle: conf/category/ has no botle.yaml; did you mean category=bottle? "
        "Or, for your own folders: category.name=botle data.root=<folder> (docs/data.md)"
    )
    assert rest == ["Set HYDRA_FULL_ERROR=1 for the full traceback."]
    typo = subprocess.run(
        [sys.executable, "train.py", "threshold=optunna"], cwd=ROOT, capture_output=True, text=True
    )
    assert "did you mean threshold=optuna?" in typo.stderr and "own folders" not in typo.stderr


def test_export_without_its_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path) -> None:
    """Before the source is even looked at: one line and the install command."""
    from patchlab.deploy.export import main as export_main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were absent
    with pytest.raises(SystemExit) as info:
        export_main(["no-such-run", "--format", "openvino", "--out", str(tmp_path / "x")])
    assert info.value.code == 1
    first, second = capsys.readouterr().err.strip().splitlines()
    assert first.startswith("Error: openvino is not installed; install the export extra: pip")
    assert second == "Set HYDRA_FULL_ERROR=1 for the full traceback."
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_sweep_prints_one_line_per_failed_job(synthetic_root, tmp_path) -> None:
    """Each failed job is one console line with its log's path; the trace is in that log."""
    names = ("no_such_part", "nor_this_one")
    command = train_command(synthetic_root, tmp_path, "-m", f"category.name={','.join(names)}")
    done = subprocess.run([*command, "tracking=none"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    console = done.stdout + done.stderr
    assert "Traceback" not in console
    for name in names:
        log = tmp_path / "multirun" / name / "train.log"
        (line,) = [line for line in console.splitlines() if "Job failed:" in line and name in line]
        assert line.endswith(f"(traceback in {log})"), line
        assert "UserError: Category folder" in line
        assert "Traceback (most recent call last):" in log.read_text()


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        (
            "predict",
            ["nosuch", "."],
            "SOURCE 'nosuch' is not an existing file or folder, an MLflow",
        ),
        ("tune", ["0" * 32], f"Could not read run {'0' * 32} at sqlite:"),
        ("report", ["--experiment", "nosuch"], "No MLflow experiment named 'nosuch' at sqlite:"),
        ("render", ["nowhere"], "nowhere is not a finished run folder"),
    ],
)
def test_every_tool_answers_a_bad_source_in_one_line(
    tool, args, message, tmp_path, capsys, monkeypatch
) -> None:
    import importlib

    from patchlab.cli import COMMANDS

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"] if tool != "render" else []
    out = ["--out", str(tmp_path / "out")] if tool in ("predict", "report") else []
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(COMMANDS[tool]).main([*args, *store, *out])
    assert stopped.value.code == 1
    lines = [
        line for line in capsys.readouterr().err.splitlines() if not MLFLOW_STORE_LOG.match(line)
    ]
    assert len(lines) == 2 and lines[0].startswith(f"Error: {message}"), lines
