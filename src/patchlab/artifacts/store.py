"""Where the MLflow store is and how to point at it: shared by train.py and the reading tools.

The tools (predict, export, report, tune) start from the same default as training, so they
read the store train.py wrote from the same folder without loading any config file. MLflow
itself is imported only by the functions that need it.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote

from omegaconf import DictConfig

DEFAULT_ROOT = "mlruns"  # conf/tracking's `root`; a test keeps the two equal
LOCAL_UI = "http://127.0.0.1:5000"
RUNS_VIEW = "patchlab"  # the experiment's saved runs-table view (see jobs/tracking.py)
USERINFO = re.compile(r"^(?P<scheme>https?://)(?P<user>[^/@:]+):(?P<password>[^/@]*)@", re.I)
# A `user:password@` anywhere in a text (a log line, a config file), for `redact`.
SECRETS: set[str] = set()  # the passwords `without_credentials` took out, for `redact`
ANY_USERINFO = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/@:\s]+):[^/@\s]+@", re.I)


def without_credentials(uri: str) -> str:
    """The URI less a `user:password@`, which goes to MLFLOW_TRACKING_USERNAME / _PASSWORD:
    MLflow's requests authenticate from those, and nothing writes them anywhere."""
    match = USERINFO.match(uri)
    if match is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(match["user"])
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(match["password"])
    SECRETS.update({match["password"], unquote(match["password"])})
    return match["scheme"] + uri[match.end() :]


def redact(text: str) -> str:
    """The text with every URI's password, and every password this process was given,
    replaced by `***`: as written, URL-quoted, or escaped as Hydra writes overrides."""
    text = ANY_USERINFO.sub(r"\g<head>:***@", text)
    given = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    for secret in SECRETS | ({given} if given else set()):
        if len(secret) >= 4:  # a shorter "password" would redact ordinary words
            escaped = re.sub(r"([\\()\[\]{}:=, '\"])", r"\\\1", secret)
            for form in {secret, quote(secret, safe=""), escaped}:
                text = text.replace(form, "***")
    return text


def tracking_uri(tracking: DictConfig) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else the sqlite store under `tracking.root`."""
    if tracking.uri:
        return without_credentials(str(tracking.uri))
    return default_tracking_uri(tracking.root)


def given_tracking_uri(given: str | None) -> str:
    """A tool's --tracking-uri (credentials taken out), else where train.py logs by default."""
    return without_credentials(given) if given else default_tracking_uri()


def default_tracking_uri(root: str | Path = DEFAULT_ROOT) -> str:
    """Where train.py logs when no URI is given: MLFLOW_TRACKING_URI, else sqlite under `root`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return without_credentials(os.environ["MLFLOW_TRACKING_URI"])
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


def study_storage(storage: str | None, tracking: DictConfig, output_dir: Path) -> str:
    """The Optuna storage a run's study goes to: `threshold.storage` when set, else optuna.db
    beside MLflow's store, or in the run's own folder when tracking is off."""
    if storage:
        return storage
    folder = Path(tracking.root) if tracking.enabled else output_dir
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"
