"""A throwaway PostgreSQL server for the team-server tests: its own data folder and port,
stopped and deleted afterwards. Skips the test when the binaries are absent."""

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.mlflow_server import free_port

INSTALL = "apt-get install postgresql (Debian) and pip install psycopg2-binary"


def binaries() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def skip_reason() -> str | None:
    if binaries() is None:
        return f"PostgreSQL binaries (initdb, pg_ctl) not found: {INSTALL}"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return f"psycopg2 is not installed: {INSTALL}"
    return None


@contextmanager
def postgres_database() -> Iterator[str]:
    """A running server with an empty `mlflow` database; yields its SQLAlchemy URI.

    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user, in a
    folder of its own under the system's tmp dir (pytest's tmp dirs are private to root).
    """
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    bin_dir = binaries()
    folder = Path(tempfile.mkdtemp(prefix="patchlab-pg-"))
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if prefix:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def run(*command: str) -> None:
        subprocess.run([*prefix, *command], check=True, capture_output=True, cwd=folder)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(folder / "log"),
            "-w",
            "start",
        )
        try:
            run(
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "mlflow",
                "mlflow",
            )
            yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
