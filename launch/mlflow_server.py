"""``pretrain mlflow-server``: the team tracking server that runs log to by URI.

Runs ``mlflow server`` in the foreground with a sqlite file or a PostgreSQL database as
backend store and a folder (or object-store URI) as artifact root, served through the
server (``--artifacts-destination``) so clients need no storage credentials. One worker
and no job execution (MLflow's job runner starts a dozen processes otherwise). Runs point
at it with ``tracking.uri=http://HOST:PORT`` or ``MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import os
import subprocess
import sys


def server_command(backend: str, artifacts: str, host: str, port: int) -> list:
    """The ``mlflow server`` command line."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", "1"]


def serve(backend: str, artifacts: str, host: str, port: int) -> int:
    """Create the sqlite/artifact folders when local, then run the server until it is stopped."""
    if backend.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(backend[len("sqlite:///"):])), exist_ok=True)
    if "://" not in artifacts:
        os.makedirs(artifacts, exist_ok=True)
        artifacts = os.path.abspath(artifacts)
    print(f"MLflow server on http://{host}:{port} (backend {backend}, artifacts {artifacts}); "
          f"runs log to it with tracking.uri=http://{host}:{port}", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return subprocess.call(server_command(backend, artifacts, host, port), env=env)
