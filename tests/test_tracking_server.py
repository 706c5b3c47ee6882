"""Training logs to a real MLflow tracking server given by URI (started here with `pretrain mlflow-server`,
stopped after); `pretrain status` links the run on the server."""
import os

import pytest

from tests.conftest import TINY, run_pretrain
from tests.system_deps import require

pytestmark = pytest.mark.slow


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


def test_headless_chromium_screenshot_of_the_run_page_shows_its_metrics(mlflow_server, xray_shards, tmp_path):
    """A real browser view of a finished run (overview: status, tags, the metrics table) saved as a PNG;
    the page must have rendered (not blank, not the grey placeholders).

    Set SCREENSHOT_DIR to keep the picture (the CI log prints where it is)."""
    import shutil
    import subprocess

    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    require("chromium")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    run_pretrain(["train", *TINY, f"output_dir={tmp_path}", "name=pictured", f"data.shards={xray_shards}",
                  "data.num_workers=0", "train.steps=5", f"tracking.uri={mlflow_server}",
                  "tracking.experiment=screenshot"])
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("screenshot")
    (run,) = client.search_runs(experiment.experiment_id)
    url = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    picture = tmp_path / "mlflow_run.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--virtual-time-budget=30000", "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'shot'}",
                    f"--screenshot={picture}", url], check=True, capture_output=True, timeout=180)
    pixels = np.asarray(Image.open(picture).convert("L"))
    assert pixels.shape == (1500, 1400)
    assert len(np.unique(pixels)) > 64 and pixels.std() > 10  # text and charts, not a blank or grey page
    if os.environ.get("SCREENSHOT_DIR"):
        os.makedirs(os.environ["SCREENSHOT_DIR"], exist_ok=True)
        shutil.copy(picture, os.path.join(os.environ["SCREENSHOT_DIR"], "mlflow_run.png"))
