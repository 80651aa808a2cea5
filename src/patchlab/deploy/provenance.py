"""Where a fetched model came from, checked before it is used: its entry file is this package's
and its bank has the digests its logged model and its run recorded.

Write access to the artifact store is code execution wherever a pyfunc model is loaded (MLflow
runs the model's entry file); these checks refuse a changed model, they do not sandbox one.
"""

import re
from pathlib import Path

import yaml

from patchlab.artifacts.bank import verify_bank
from patchlab.errors import UserError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
# What MLflow runs to load the logged model; a logged model's copy must equal it byte for byte.
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
DIGESTS_KEY = "bank_digests"  # in the MLmodel file's metadata, written when the model is logged


def model_folder(bank: Path) -> Path | None:
    """The logged model a bank file came in (`<model>/artifacts/<bank>`), if it came in one."""
    folder = bank.parent.parent
    return folder if (folder / "MLmodel").is_file() else None


def verify_model(bank: Path) -> str | None:
    """Checks the logged model a bank came in, if it came in one; returns the run that logged
    it (as the model's files say).

    The entry file (the code MLflow runs to load the model) must be this package's: it lives
    in the artifact store, so whoever can write there could change it. A changed one is
    refused, though a file MLflow has already run cannot be undone. The bank must have the
    digests the model recorded when it was logged.
    """
    folder = model_folder(bank)
    if folder is None:
        return None
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    code = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("model_code_path")
    entry = folder / Path(code or ENTRY.name).name
    if not entry.is_file() or entry.read_bytes() != ENTRY.read_bytes():
        raise UserError(
            f"{entry}: refused to load: the model's entry file is not the one this patchlab "
            f"ships ({ENTRY}). Log the model again from a run made with this version."
        )
    digests = (mlmodel.get("metadata") or {}).get(DIGESTS_KEY) or {}
    verify_bank(bank, {str(k): str(v) for k, v in digests.items()}, "its logged model")
    return mlmodel.get("run_id")


def producing_run(source: str, tracking_uri: str | None) -> str | None:
    """The run behind a run id, runs:/ URI or registered version (from the registry, not from
    the fetched files)."""
    if RUN_ID.match(source):
        return source
    if source.startswith("runs:/"):
        return source.split("/")[1]
    match = REGISTERED.match(source)
    if match is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if match["alias"]:
        return client.get_model_version_by_alias(match["name"], match["alias"]).run_id
    return client.get_model_version(match["name"], match["version"]).run_id


def run_tags(run_id: str, tracking_uri: str | None) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).data.tags


def verify_fetched(source: str, bank: Path, tracking_uri: str | None) -> None:
    """A fetched model's entry file, then its bank against its model's and its run's digests."""
    run_id = producing_run(source, tracking_uri)
    logged_by = verify_model(bank)
    run_id = run_id or logged_by
    if run_id:
        verify_bank(bank, run_tags(run_id, tracking_uri), f"run {run_id}")
