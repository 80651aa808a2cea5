"""The `patchlab` command: one entry point whose sub-commands are the tools' own."""

import json
import subprocess
import sys

import pytest
from test_train import METRIC_KEYS

from helpers.configs import ROOT, train_command
from patchlab.cli import COMMANDS, main


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert all(f"patchlab {command}" in printed for command in COMMANDS)


def test_an_unknown_command_is_one_line_naming_the_choices(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["trian"])
    assert "unknown command 'trian'; choose one of train, predict" in str(stopped.value.code)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_every_tool_answers_help_under_its_sub_command(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0 and f"patchlab {command}" in capsys.readouterr().out


@pytest.mark.slow
def test_patchlab_train_is_train_py(synthetic_root, tmp_path) -> None:
    """The console script, as installed, with the same overrides as train.py."""
    command = train_command(synthetic_root, tmp_path)
    script = [sys.executable, "-m", "patchlab", "train", *command[2:]]
    result = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bottle: image_auroc=" in result.stderr + result.stdout
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written) >= METRIC_KEYS and (tmp_path / "run" / "train.log").is_file()
