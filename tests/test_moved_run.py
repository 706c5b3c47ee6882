"""Run folders that move: a run folder moved (or copied) to another path resumes there, in the same MLflow run,
and writes its new artifacts into itself, not into the folder its embedded store was created in."""
import glob
import os
import re
import shutil

import pytest
import torch

from tests.conftest import metric_history, run_pretrain
from tests.test_train_e2e import train_args

COMMON = ["data.split_by=sample", "data.num_workers=0", "data.batch_size=4", "checkpoint.every=2",
          "tracking.system_metrics=false"]
"""2 steps a start; the last step of each start is checkpointed and renders its reconstruction image."""


def store(run_dir: str):
    """(client, the run) of a run folder's embedded MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def checkpointed_run_id(run_dir: str, step: int) -> str:
    """The MLflow run id the checkpoint at ``step`` belongs to."""
    path = os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "trainer_state_rank0.pt")
    return torch.load(path, weights_only=False)["mlflow_run_id"]


def images(run_dir: str) -> list:
    """The reconstruction images in a run folder's artifact folder, by file name."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "mlartifacts", "**", "*.png"),
                                                         recursive=True))


def snapshot(folder: str) -> dict:
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


def resume(out: str, shards: str, steps: int) -> str:
    """Resume run ``moved`` under ``out`` (resume=auto) up to ``steps``; returns its log (stderr)."""
    return run_pretrain(train_args(out, "moved", shards, *COMMON, f"train.steps={steps}",
                                   "checkpoint.resume=auto")).stderr


@pytest.fixture(scope="module")
def moved(xray_shards, tmp_path_factory):
    """A 2-step run trained under scratch/, moved (shutil.move: the old folder is gone) to project/ and resumed
    there to step 4. Returns {'old', 'new': run folders, 'run_id': the first start's MLflow run, 'log'}."""
    root = tmp_path_factory.mktemp("moved")
    scratch, project = str(root / "scratch"), str(root / "project")
    run_pretrain(train_args(scratch, "moved", xray_shards, *COMMON, "train.steps=2"))
    old, new = os.path.join(scratch, "moved"), os.path.join(project, "moved")
    run_id = checkpointed_run_id(old, 2)
    os.makedirs(project)
    shutil.move(old, new)
    return {"old": old, "new": new, "run_id": run_id, "log": resume(project, xray_shards, 4)}


@pytest.mark.slow
def test_moved_run_resumes_in_the_same_mlflow_run_and_writes_into_its_new_folder(moved):
    old, new = moved["old"], moved["new"]
    assert not os.path.exists(old), "something was written at the run folder's old path"
    assert re.search(rf"run folder moved from {re.escape(old)} to {re.escape(new)}: artifact locations re-pointed",
                     moved["log"])
    client, run = store(new)
    assert run.info.run_id == moved["run_id"] == checkpointed_run_id(new, 4)  # the same run, continued
    assert run.info.artifact_uri.startswith(f"file://{new}/mlartifacts/")
    assert client.get_experiment(run.info.experiment_id).artifact_location == f"file://{new}/mlartifacts"
    assert [step for step, _ in metric_history(new)] == [1, 2, 3, 4]  # the metrics after the resume, once each
    assert images(new) == ["reconstruction_step_000002.png", "reconstruction_step_000004.png"]
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "reconstruction")}
    assert listed == {"reconstruction/reconstruction_step_000002.png", "reconstruction/reconstruction_step_000004.png"}
    before = client.download_artifacts(run.info.run_id, "config.yaml")  # logged before the move, read here
    assert os.path.getsize(before) > 0


@pytest.mark.slow
def test_copied_run_resumes_in_the_copy_and_leaves_the_original_untouched(moved, xray_shards, tmp_path):
    from pretrain.tracking import StoredRun

    original = moved["new"]
    untouched = snapshot(original)
    copy = os.path.join(str(tmp_path), "moved")
    shutil.copytree(original, copy)
    resume(str(tmp_path), xray_shards, 6)
    bundle = tmp_path / "bundle"  # what export logs after training, through the run's store
    bundle.mkdir()
    (bundle / "model.txt").write_text("weights")
    StoredRun(f"sqlite:///{copy}/mlflow.db", moved["run_id"]).log_artifacts(str(bundle), "exports/step_000006")
    assert snapshot(original) == untouched
    _, run = store(copy)
    assert run.info.run_id == moved["run_id"] and run.info.artifact_uri.startswith(f"file://{copy}/mlartifacts/")
    assert "reconstruction_step_000006.png" in images(copy) and "reconstruction_step_000006.png" not in images(original)
    assert glob.glob(os.path.join(copy, "mlartifacts", "*", "artifacts", "exports", "step_000006", "model.txt"))
    assert store(original)[1].info.artifact_uri.startswith(f"file://{original}/mlartifacts/")


def test_only_locations_in_another_folders_mlartifacts_are_re_pointed_and_a_symlinked_path_is_no_move(tmp_path):
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import follow_moved_folder

    old, new = tmp_path / "old", tmp_path / "new"
    uri = f"sqlite:///{new}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    moved = client.create_experiment("moved", artifact_location=f"file://{old}/mlartifacts")
    other = client.create_experiment("other", artifact_location=f"file://{tmp_path}/team/artifacts")
    run, kept = client.create_run(moved), client.create_run(other)
    client.create_registered_model("m")
    version = client.create_model_version("m", f"{run.info.artifact_uri}/exports/step_000002", run_id=run.info.run_id)
    (new / "mlartifacts").mkdir()
    (tmp_path / "link").symlink_to(new)
    follow_moved_folder(uri)
    follow_moved_folder(uri)  # in place already: nothing to do
    follow_moved_folder(f"sqlite:///{tmp_path}/link/mlflow.db")  # the same folder by another name: no move
    here = f"file://{new}/mlartifacts"
    assert client.get_experiment(moved).artifact_location == here
    assert client.get_run(run.info.run_id).info.artifact_uri == f"{here}/{run.info.run_id}/artifacts"
    source = client.get_model_version("m", version.version).source
    assert source == f"{here}/{run.info.run_id}/artifacts/exports/step_000002"
    assert client.get_experiment(other).artifact_location == f"file://{tmp_path}/team/artifacts"
    assert client.get_run(kept.info.run_id).info.artifact_uri.startswith(f"file://{tmp_path}/team/artifacts/")
