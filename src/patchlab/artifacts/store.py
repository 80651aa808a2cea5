"""Where the MLflow store is and how to point at it: shared by train.py and the reading tools.

The tools (predict, export, report, tune) start from the same default as training, so they
read the store train.py wrote from the same folder without loading any config file. MLflow
itself is imported only by the functions that need it.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

DEFAULT_ROOT = "mlruns"  # conf/tracking's `root`; a test keeps the two equal
LOCAL_UI = "http://127.0.0.1:5000"
RUNS_VIEW = "patchlab"  # the experiment's saved runs-table view (see jobs/tracking.py)


def tracking_uri(tracking: DictConfig) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else the sqlite store under `tracking.root`."""
    if tracking.uri:
        return str(tracking.uri)
    return default_tracking_uri(tracking.root)


def default_tracking_uri(root: str | Path = DEFAULT_ROOT) -> str:
    """Where train.py logs when no URI is given: MLFLOW_TRACKING_URI, else sqlite under `root`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that afterwards, or the
    next run in this process would silently follow it instead of its own config."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def ui_url(uri: str) -> str:
    """A tracking server is its own UI; a local store is opened with `mlflow ui`."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def runs_view_url(ui: str, experiment: str) -> str:
    """The experiment's runs table with the metric and setting columns shown."""
    return f"{ui}/#/experiments/{experiment}/runs?viewStateShareKey={RUNS_VIEW}"


def run_url(ui: str, experiment: str, run_id: str) -> str:
    """One run's page in the MLflow UI."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
