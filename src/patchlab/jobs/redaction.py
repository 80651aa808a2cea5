"""No password in what a job leaves behind, when one was given inside `tracking.uri`.

MLflow takes it from the environment (`artifacts.store.without_credentials`); what Hydra
already wrote (the command line in `.hydra/`, `multirun.yaml`) and every log line from here
on show `user:***@` instead. Passing MLFLOW_TRACKING_USERNAME / _PASSWORD in the environment
keeps the password out of the command line, and so out of the shell's history, too.
"""

import logging
from pathlib import Path

from patchlab.artifacts.store import redact, without_credentials


def redact_logs() -> None:
    """Every log record made in this process from now on is redacted when it is made, so no
    handler Hydra (re)configures later can write a password, whichever logger made it."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacted(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: the logging machinery reports it later
            return record
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return record

    redacted.redacts = True
    logging.setLogRecordFactory(redacted)


def redact_hydra_files(*folders: Path) -> None:
    """Hydra's record of the command line and config, in a job or sweep folder, redacted."""
    for folder in folders:
        for path in [*folder.glob(".hydra/*.yaml"), *folder.glob("multirun.yaml")]:
            text = path.read_text()
            clean = redact(text)
            if clean != text:
                path.write_text(clean)


def hide_credentials(uri: str | None, *folders: Path) -> None:
    """Takes a password out of `uri` (into MLflow's environment), then redacts the logs from
    here on and what Hydra wrote into `folders`."""
    if uri:
        without_credentials(str(uri))
    redact_logs()
    redact_hydra_files(*folders)
