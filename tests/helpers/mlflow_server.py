"""Starts a real MLflow server (or UI) on 127.0.0.1 at a free port, and stops it."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(command: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Runs `command` (a server on 127.0.0.1:`port`); yields its URL once /health answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError(f"server at {url} did not answer within 120 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def mlflow_server(
    backend: str,
    artifacts: Path | None = None,
    ui: bool = False,
    auth_config: Path | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """A tracking server (or the UI) over `backend`; always stopped.

    `auth_config`: MLflow's basic-auth app with that config file (as docs/clusters.md starts
    it). `port`: a fixed port, to start a server again where its clients expect it.
    """
    port = port or free_port()
    command = [sys.executable, "-m", "mlflow", "ui" if ui else "server"]
    command += ["--backend-store-uri", backend, "--host", "127.0.0.1", "--port", str(port)]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts), "--serve-artifacts"]
    env = None
    if auth_config is not None:
        command += ["--app-name", "basic-auth"]
        env = os.environ | {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key",
        }
    with serving(command, port, env) as url:
        yield url


@contextmanager
def model_server(model_uri: str, tracking_uri: str) -> Iterator[str]:
    """`mlflow models serve` in this environment (no new virtualenv); always stopped."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri}
    with serving(command, port, env) as url:
        yield url


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run, as paths relative to its artifact root."""
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths
