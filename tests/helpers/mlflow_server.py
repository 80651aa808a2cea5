"""Starts a real MLflow server (or UI) on 127.0.0.1 at a free port, and stops it."""

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(backend: str, artifacts: Path | None = None, ui: bool = False) -> Iterator[str]:
    """Yields the server's http URL once its health check answers; always stops it."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui" if ui else "server",
        "--backend-store-uri",
        backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow exited: {process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError(f"mlflow at {url} did not answer within 90 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
