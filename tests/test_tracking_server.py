"""Training logs to a real MLflow tracking server given by URI (started here with `pretrain mlflow-server`,
stopped after); `pretrain status` links the run on the server."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pretrain.dist import free_port
from tests.conftest import REPO, TINY, run_pretrain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = subprocess.Popen(  # the documented way: `pretrain mlflow-server`
        [sys.executable, "-m", "pretrain.main", "mlflow-server", "--backend", f"sqlite:///{root}/team/server.db",
         "--artifacts", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, start_new_session=True, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"MLflow server did not answer: {(root / 'server.log').read_text()[-2000:]}")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_run_logs_metrics_params_and_images_to_the_server(mlflow_server, xray_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    run_pretrain(["train", *TINY, f"output_dir={tmp_path}", "name=served", f"data.shards={xray_shards}",
                  "data.num_workers=0", "train.steps=3", f"tracking.uri={mlflow_server}",
                  "tracking.experiment=server-test"])
    assert not os.path.exists(os.path.join(str(tmp_path), "served", "mlflow.db"))
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs(experiment.experiment_id)
    assert run.info.status == "FINISHED" and run.data.params["data.num_workers"] == "0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    names = [a.path for a in client.list_artifacts(run.info.run_id, "reconstruction")]
    assert names == ["reconstruction/reconstruction_step_000003.png"]
    status = run_pretrain(["status", os.path.join(str(tmp_path), "served")]).stdout
    assert f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in status
