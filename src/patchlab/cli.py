"""`patchlab <command>`: train, predict, export, report, render and tune from one entry point.

    patchlab train category=bottle backbone=efficientnet_lite2 data.root=...   (Hydra overrides)
    patchlab predict SOURCE INPUT... --out DIR
    patchlab export SOURCE --format onnx --out DIR
    patchlab report [--sweep multirun/...]
    patchlab render RUN_DIR
    patchlab tune RUN_ID

`patchlab <command> --help` explains each. Each is also `python -m patchlab.<command>`
(`python train.py` for train).
"""

import importlib
import sys
from pathlib import Path

from patchlab.errors import UserError, exit_now, exit_on_user_error

COMMANDS = {  # train is Hydra's; the others take argparse arguments
    "train": "patchlab.jobs.train",
    "predict": "patchlab.deploy.predict",
    "export": "patchlab.deploy.export",
    "report": "patchlab.reporting.report",
    "render": "patchlab.reporting.render",
    "tune": "patchlab.jobs.retune",
}


def config_dir() -> Path:
    """The project's `conf/`: in the working directory, else beside the installed sources."""
    for candidate in (Path.cwd() / "conf", Path(__file__).resolve().parents[2] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UserError(
        "patchlab train needs the project's conf/ folder: run it from the project root "
        "(where train.py and conf/ are)"
    )


@exit_on_user_error
def train(argv: list[str]) -> None:
    """Hands the overrides to Hydra with the project's configs, as `python train.py` does."""
    import hydra

    from patchlab.jobs import job_folder
    from patchlab.jobs.settings import check_group_choices
    from patchlab.jobs.train import job

    check_group_choices(argv, config_dir())
    job_folder.register()
    main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    sys.argv = ["patchlab train", *argv]
    main(exit_on_user_error(job))()
    exit_now()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"Error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
        return
    importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    main()
