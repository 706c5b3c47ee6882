"""``pretrain mlflow-server``: the team tracking server that runs log to by URI.

Runs ``mlflow server`` in the foreground with a sqlite file or a PostgreSQL database as
backend store and a folder (or object-store URI) as artifact root, served through the
server (``--artifacts-destination``) so clients need no storage credentials. One worker
and no job execution (MLflow's job runner starts a dozen processes otherwise). Runs point
at it with ``tracking.uri=http://HOST:PORT`` or ``MLFLOW_TRACKING_URI``.

A server bound to anything but loopback lets no one in without a password: it runs MLflow's
basic-auth app (``--app-name basic-auth``; ``--auth`` turns it on for loopback too), whose
users live in their own auth database. The admin account is created on the first start from
``PRETRAIN_MLFLOW_ADMIN_USERNAME`` / ``PRETRAIN_MLFLOW_ADMIN_PASSWORD``; without them a
non-loopback server refuses to start. MLflow reads the admin account from an ini file
(``MLFLOW_AUTH_CONFIG_PATH``), written owner-only (0600) into the server's folder and never
printed. MLflow's own ``MLFLOW_AUTH_*`` variables (another ini, admin name and password) would
take precedence over that file, so they are kept from the server's environment, and so are the
two variables above: the ini is the only source.
Runs authenticate with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which
MLflow's client reads from the environment itself.
"""
from __future__ import annotations

import configparser
import importlib.util
import ipaddress
import os
import secrets
import subprocess
import sys
from typing import Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

ADMIN_USERNAME, ADMIN_PASSWORD = "PRETRAIN_MLFLOW_ADMIN_USERNAME", "PRETRAIN_MLFLOW_ADMIN_PASSWORD"
AUTH_INI = "basic_auth.ini"
MIN_PASSWORD = 12
"""The shortest password MLflow's basic-auth app accepts (checked here to name our variable)."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an unspecified address (0.0.0.0, ::): the network reaches it


def server_folder(backend: str) -> str:
    """Where the auth database and its ini live: beside a sqlite backend, else ``./mlflow``."""
    if backend.startswith("sqlite:///"):
        return os.path.dirname(os.path.abspath(backend[len("sqlite:///"):]))
    return os.path.abspath("mlflow")


def admin_credentials(environ: Mapping[str, str]) -> tuple:
    """The admin (username, password) from the environment, or a ValueError that says what is missing."""
    username, password = environ.get(ADMIN_USERNAME, ""), environ.get(ADMIN_PASSWORD, "")
    missing = [name for name, value in ((ADMIN_USERNAME, username), (ADMIN_PASSWORD, password)) if not value]
    if missing:
        raise ValueError(f"an MLflow server with authentication needs its admin account: set {' and '.join(missing)} "
                         "in the environment (a server bound to anything but loopback always has authentication)")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"{ADMIN_PASSWORD} is too short: MLflow's basic-auth app needs at least {MIN_PASSWORD} "
                         "characters")
    if any(value != value.strip() or "\n" in value or "\r" in value for value in (username, password)):
        raise ValueError(f"{ADMIN_USERNAME} and {ADMIN_PASSWORD} must not contain line breaks or start or end "
                         "with white space (MLflow reads them from an ini file)")
    return username, password


def write_auth_config(folder: str, database: str, username: str, password: str) -> str:
    """Write MLflow's basic-auth ini (owner-only) into ``folder`` and return its path.

    ``default_permission = READ``: every signed-in user sees every experiment, and edits only what
    they created or were given. ``%`` is doubled because MLflow reads the file with interpolation.
    """
    config = configparser.ConfigParser()
    config["mlflow"] = {"default_permission": "READ", "database_uri": database.replace("%", "%%"),
                        "admin_username": username.replace("%", "%%"),
                        "admin_password": password.replace("%", "%%"),
                        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    path = os.path.join(folder, AUTH_INI)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file may have had wider permissions
    with os.fdopen(descriptor, "w") as handle:
        config.write(handle)
    return path


def auth_environment(folder: str, database: str, environ: Mapping[str, str]) -> dict:
    """The server's environment additions for the basic-auth app; writes its ini into ``folder``."""
    username, password = admin_credentials(environ)
    if importlib.util.find_spec("flask_wtf") is None:
        raise ValueError("MLflow's basic-auth app needs Flask-WTF: pip install 'medvit-pretrain[server]'")
    os.makedirs(folder, exist_ok=True)
    extra = {"MLFLOW_AUTH_CONFIG_PATH": write_auth_config(folder, database, username, password)}
    if not environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):  # CSRF key of the sign-up form; one worker shares it
        extra["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return extra


def redacted(uri: str) -> str:
    """``uri`` with the password of its user part (postgresql://USER:PASS@HOST) replaced, for printing."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def server_command(backend: str, artifacts: str, host: str, port: int, auth: bool = False) -> list:
    """The ``mlflow server`` command line (with MLflow's basic-auth app when ``auth``)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", "1",
            *(["--app-name", "basic-auth"] if auth else [])]


def serve(backend: str, artifacts: str, host: str, port: int, auth: bool = False,
          auth_db: Optional[str] = None) -> int:
    """Create the sqlite/artifact folders when local, then run the server until it is stopped.

    Authentication is on when ``auth`` or when ``host`` is not loopback; the admin credentials
    are checked before anything is created or started.
    """
    auth = auth or not is_loopback(host)
    env = {key: value for key, value in os.environ.items()  # the admin account reaches MLflow by the ini only
           if not key.startswith("MLFLOW_AUTH_") and key not in (ADMIN_USERNAME, ADMIN_PASSWORD)}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    access = "no authentication"
    if auth:
        folder = server_folder(backend)
        auth_db = auth_db or f"sqlite:///{os.path.join(folder, 'basic_auth.db')}"
        env.update(auth_environment(folder, auth_db, os.environ))
        access = f"authentication on: MLflow basic-auth, users in {redacted(auth_db)}"
    if backend.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(backend[len("sqlite:///"):])), exist_ok=True)
    if "://" not in artifacts:
        os.makedirs(artifacts, exist_ok=True)
        artifacts = os.path.abspath(artifacts)
    print(f"MLflow server on http://{host}:{port} (backend {redacted(backend)}, artifacts {artifacts}; {access}); "
          f"runs log to it with tracking.uri=http://{host}:{port}"
          + (" and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment" if auth else ""),
          flush=True)
    return subprocess.call(server_command(backend, artifacts, host, port, auth), env=env)
