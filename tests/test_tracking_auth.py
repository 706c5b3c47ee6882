"""The team tracking server with MLflow's authentication on (`pretrain mlflow-server --auth`, the real
basic-auth app): strangers are refused, a run with credentials in its environment logs, and no
credential leaks into a log, a config dump or an MLflow param. Off loopback, authentication is
mandatory and a server without admin credentials refuses to start."""
import base64
import json
import os
import secrets
import stat
import urllib.error
import urllib.request

import pytest

from launch.mlflow_server import (ADMIN_PASSWORD, ADMIN_USERNAME, admin_credentials, is_loopback, redacted,
                                  write_auth_config)
from tests.conftest import REPO, TINY, run_pretrain


def test_loopback_addresses_are_told_from_network_ones():
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "gpu-node-1", ""))


def test_printed_store_uris_hide_their_passwords():
    assert redacted("postgresql://team:s3cr%40t@db.local:5432/mlflow") == "postgresql://team:***@db.local:5432/mlflow"
    assert redacted("sqlite:////shared/mlflow/mlflow.db") == "sqlite:////shared/mlflow/mlflow.db"
    assert redacted("postgresql://team@db.local/mlflow") == "postgresql://team@db.local/mlflow"


def test_a_network_server_without_admin_credentials_refuses_to_start(tmp_path, monkeypatch):
    for name in (ADMIN_USERNAME, ADMIN_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=f"set {ADMIN_USERNAME} and {ADMIN_PASSWORD}"):
        admin_credentials(os.environ)
    with pytest.raises(ValueError, match="too short"):
        admin_credentials({ADMIN_USERNAME: "boss", ADMIN_PASSWORD: "short"})
    monkeypatch.setenv(ADMIN_USERNAME, "boss")  # the password alone missing is named alone
    result = run_pretrain(["mlflow-server", "--backend", f"sqlite:///{tmp_path}/team/server.db", "--artifacts",
                           str(tmp_path / "artifacts"), "--host", "0.0.0.0", "--port", "1"], timeout=120, check=False)
    assert result.returncode == 2
    assert f"pretrain mlflow-server: error: an MLflow server with authentication needs its admin account: set " \
           f"{ADMIN_PASSWORD} in the environment" in result.stderr
    assert not os.path.exists(tmp_path / "team")  # refused before anything was created


def test_the_auth_ini_is_owner_only_and_mlflow_reads_the_password_back(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    password = "p%(a)s ss;#word=1"  # interpolation, comment and separator characters survive
    path = write_auth_config(str(tmp_path), f"sqlite:///{tmp_path}/auth.db", "boss", password)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", path)
    config = read_auth_config()
    assert (config.admin_username, config.admin_password) == ("boss", password)
    assert config.database_uri == f"sqlite:///{tmp_path}/auth.db" and config.default_permission == "READ"


def _request(url: str, credentials=None, body=None):
    """The HTTP status of a GET, or a POST of JSON ``body``, with basic auth when ``credentials``."""
    headers = {"Content-Type": "application/json"}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real server with authentication on (loopback, so ``--auth``), random admin credentials."""
    from tests.servers import MLflowServer

    admin = (f"admin-{secrets.token_hex(4)}", secrets.token_urlsafe(18))
    server = MLflowServer(str(tmp_path_factory.mktemp("auth_server")), REPO,
                          auth_env={ADMIN_USERNAME: admin[0], ADMIN_PASSWORD: admin[1]}).start()
    yield server, admin
    server.stop()


def _files_containing(folder: str, secrets_: list) -> list:
    """Paths of the files under ``folder`` whose bytes contain any of ``secrets_``."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                data = handle.read()
            found += [os.path.join(root, name) for secret in secrets_ if secret.encode() in data]
    return found


@pytest.mark.slow
def test_strangers_are_refused_and_a_run_with_credentials_logs_without_leaking_them(
        auth_server, xray_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    server, admin = auth_server
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _request(search) == 401
    assert _request(search, (admin[0], admin[1] + "x")) == 401
    assert _request(f"{server.url}/health") == 200
    assert os.path.exists(os.path.join(server.root, "team", "basic_auth.ini"))
    assert stat.S_IMODE(os.stat(os.path.join(server.root, "team", "basic_auth.ini")).st_mode) == 0o600
    user = (f"trainer-{secrets.token_hex(4)}", secrets.token_urlsafe(18))  # a team member's account
    assert _request(f"{server.url}/api/2.0/mlflow/users/create", admin, {"username": user[0],
                                                                         "password": user[1]}) == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    result = run_pretrain(["train", *TINY, f"output_dir={tmp_path}", "name=signed", f"data.shards={xray_shards}",
                           "data.num_workers=0", "train.steps=3", f"tracking.uri={server.url}",
                           "tracking.experiment=auth-test"])
    run_dir = os.path.join(str(tmp_path), "signed")
    status = run_pretrain(["status", run_dir]).stdout
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("auth-test")
    (run,) = client.search_runs(experiment.experiment_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert f"{server.url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in status

    secret_words = [user[0], user[1], admin[1]]
    with open(tmp_path / "run.log", "w") as log:
        log.write(result.stdout + result.stderr + status)
    assert _files_containing(str(tmp_path), secret_words) == []  # the run's log, its folder, config.yaml
    assert _files_containing(os.path.join(server.root, "artifacts"), secret_words) == []  # config.yaml artifact
    with open(server.log) as log:
        server_log = log.read()
    assert "401" in server_log and not [word for word in secret_words if word in server_log]
    params = " ".join([*run.data.params.keys(), *run.data.params.values()])
    assert not [word for word in secret_words if word in params]
    # The server itself names the signed-in user as the run's owner (MLflow's attribution, not a leak).
    assert {tag for tag, value in run.data.tags.items() if user[0] in value} == {"mlflow.user"}
    assert not [word for word in secret_words[1:] if word in " ".join(run.data.tags.values())]
