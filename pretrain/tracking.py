"""Experiment tracking: MLflow on rank 0, a null tracker on every other rank; and the one door to mlflow.

Every use of the mlflow package goes through this module: the training run's tracker
(:class:`MLflowTracker`), and :class:`StoredRun` for what reads or adds to a finished run afterwards
(export logs and registers its bundle, ``pretrain status`` links the run). mlflow is imported inside
the functions that use it, so the JSON-lines and null trackers work where it is not installed.

With no URI in the config and no ``MLFLOW_TRACKING_URI``, runs go to an embedded sqlite
store inside the run folder (``mlflow.db`` + ``mlartifacts/``); nothing needs to be
started, and ``mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db`` shows it. MLflow records
artifact locations as absolute paths; a run folder moved or copied elsewhere (scratch to project
storage, another cluster) has its store's locations re-pointed to its own ``mlartifacts/`` when the
store is opened there (:func:`follow_moved_folder`), so it keeps writing into itself.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from typing import Dict, Optional

import numpy as np

log = logging.getLogger(__name__)


class NullTracker:
    """Accepts every call and records nothing (non-zero ranks, tracking disabled)."""

    run_id: Optional[str] = None

    def log_params(self, params: Dict) -> None:
        """Record run parameters."""

    def set_tags(self, tags: Dict[str, str]) -> None:
        """Record run tags."""

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Record scalar metrics at a step."""

    def log_metrics_many(self, rows: list) -> None:
        """Record several steps' metrics, [(metrics, step), ...], in one round trip where the store allows."""
        for metrics, step in rows:
            self.log_metrics(metrics, step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """Record an image (uint8 [H, W] or [H, W, 3]) at a step."""

    def log_artifact(self, path: str, folder: Optional[str] = None) -> None:
        """Record a file."""

    def flush(self, timeout: float = 120.0) -> bool:
        """Wait until what was logged has reached the store (up to ``timeout`` s); True when it has."""
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run with a status (FINISHED, FAILED, KILLED)."""


def git_commit() -> str:
    """The commit of the code being run, or 'unknown' outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


EMBEDDED_DB, EMBEDDED_ARTIFACTS = "mlflow.db", "mlartifacts"
"""The embedded store in a run folder: its sqlite file and, beside it, its artifact folder."""


def tracking_uri(cfg, run_dir: str) -> str:
    """Config URI, else MLFLOW_TRACKING_URI, else the embedded sqlite store in the run folder."""
    return (cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{os.path.join(os.path.abspath(run_dir), EMBEDDED_DB)}")


def _embedded_folder(uri: str) -> Optional[str]:
    """The folder of the store at ``uri`` when it has the embedded layout (a sqlite ``mlflow.db`` beside an
    ``mlartifacts/`` folder), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = os.path.abspath(uri[len("sqlite:///"):])
    folder = os.path.dirname(path)
    if os.path.basename(path) != EMBEDDED_DB or not os.path.isfile(path):
        return None
    return folder if os.path.isdir(os.path.join(folder, EMBEDDED_ARTIFACTS)) else None


def _elsewhere(location: Optional[str], here: str) -> bool:
    """Whether an experiment's artifact location is the ``mlartifacts/`` folder of another run folder than
    ``here`` (``file://`` URIs; another spelling of the same folder, through a symbolic link, is not)."""
    location = location or ""
    if location == here or not (location.startswith("file://") and location.endswith("/" + EMBEDDED_ARTIFACTS)):
        return False
    path = location[len("file://"):]
    return not (os.path.isdir(path) and os.path.samefile(path, here[len("file://"):]))


def follow_moved_folder(uri: str) -> None:
    """Re-point an embedded store's artifact locations to the ``mlartifacts/`` beside it, when they name the
    ``mlartifacts/`` of another folder: the run folder was moved or copied since they were recorded.

    MLflow keeps absolute ``file://`` locations (the experiment's, from which each run's artifact URI,
    logged model's and registered version's source were derived) and offers no call to change them: they
    are rewritten through MLflow's own SQL store and table models, in one transaction. Locations outside
    an ``mlartifacts/`` folder (another artifact root, a server's proxied ``mlflow-artifacts:``) are left
    alone. Artifacts already logged are read from the new place, since they moved with the folder.
    """
    folder = _embedded_folder(uri)
    if folder is None:
        return
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersion
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlLoggedModel, SqlRun
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    start = time.perf_counter()
    here = "file://" + os.path.join(folder, EMBEDDED_ARTIFACTS)
    columns = {SqlExperiment: ("artifact_location",), SqlRun: ("artifact_uri",),
               SqlLoggedModel: ("artifact_location",), SqlModelVersion: ("source", "storage_location")}
    with SqlAlchemyStore(uri, here).ManagedSessionMaker(read_only=False) as session:
        roots = {e.artifact_location for e in session.query(SqlExperiment) if _elsewhere(e.artifact_location, here)}
        if not roots:
            return
        alternatives = "|".join(re.escape(root) for root in sorted(roots, key=len, reverse=True))
        old = re.compile(f"(?:{alternatives})(?=/|$)")  # a whole old root: the folder or a path inside it
        for model, names in columns.items():
            for row in session.query(model):
                for name in names:
                    if match := old.match(getattr(row, name) or ""):
                        setattr(row, name, here + getattr(row, name)[match.end():])
    moved_from = ", ".join(os.path.dirname(root[len("file://"):]) for root in sorted(roots))
    log.info("run folder moved from %s to %s: artifact locations re-pointed (%.0f ms)", moved_from, folder,
             (time.perf_counter() - start) * 1000)


class MLflowTracker(NullTracker):
    """An MLflow run, new or continued (``run_id`` from a checkpoint)."""

    def __init__(self, cfg, run_dir: str, run_name: str, run_id: Optional[str] = None):
        import mlflow

        self.mlflow = mlflow
        uri = tracking_uri(cfg, run_dir)
        embedded = not cfg.uri and "MLFLOW_TRACKING_URI" not in os.environ
        follow_moved_folder(uri)  # before the run continues: its new artifacts go into this folder
        mlflow.set_tracking_uri(uri)  # note: this also sets MLFLOW_TRACKING_URI in the environment
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = "file://" + os.path.abspath(os.path.join(run_dir, EMBEDDED_ARTIFACTS)) if embedded else None
            experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        if cfg.system_metrics:
            mlflow.set_system_metrics_sampling_interval(cfg.system_metrics_interval)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id, log_system_metrics=cfg.system_metrics)
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                        log_system_metrics=cfg.system_metrics)
        self.run_id = self.run.info.run_id
        # Calls go through a client naming the run: they may come from the tracking thread, and the fluent
        # API's active run belongs to the thread that started it (which closes it in finish()).
        self.client = mlflow_client(uri)
        log.info("MLflow run %s at %s", self.run_id, uri)

    def log_params(self, params: Dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: Dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.log_metrics_many([(metrics, step)])

    def log_metrics_many(self, rows: list) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for metrics, step in rows for k, v in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}_step_{step:06d}.png")
            Image.fromarray(image).save(path)
            self.client.log_artifact(self.run_id, path, artifact_path=name)

    def log_artifact(self, path: str, folder: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def mlflow_client(uri: str):
    """An MlflowClient on the store at ``uri`` (a sqlite file or a tracking server)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class StoredRun:
    """An existing MLflow run, by id, in the store at ``uri``: read and added to after training (an embedded
    store in a moved run folder is re-pointed first: the bundle is logged into that folder)."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        follow_moved_folder(uri)
        self.client = mlflow_client(uri)

    def summary(self) -> dict:
        """{'metrics': latest value of each metric, 'params': params} of the run."""
        data = self.client.get_run(self.run_id).data
        return {"metrics": dict(data.metrics), "params": dict(data.params)}

    def web_address(self) -> str:
        """The run's page in the tracking server's web UI (``uri`` is the server's address)."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"{self.uri.rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}"

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        """Add the files of ``folder`` to the run under ``artifact_path``."""
        self.client.log_artifacts(self.run_id, folder, artifact_path=artifact_path)

    def register(self, model_name: str, artifact_path: str, description: str) -> str:
        """A new version of registered model ``model_name`` (created when missing) pointing at the run's
        artifacts ``artifact_path``; returns the version number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        return self.client.create_model_version(model_name, source, run_id=self.run_id,
                                                description=description).version


class JsonlTracker(NullTracker):
    """Metrics as JSON lines in ``<run>/metrics.jsonl`` ({"step": N, name: value...}), params, tags and the
    status in ``<run>/tracking.json``: tracking where MLflow is not installed. A resumed run appends."""

    def __init__(self, run_dir: str, run_name: str, run_id: Optional[str] = None):
        os.makedirs(run_dir, exist_ok=True)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.summary_path = os.path.join(run_dir, "tracking.json")
        self.run_id = run_id or f"jsonl-{run_name}"
        self.summary = {"run_id": self.run_id, "params": {}, "tags": {}, "status": "RUNNING"}
        if os.path.isfile(self.summary_path):
            with open(self.summary_path) as handle:
                self.summary.update(json.load(handle), status="RUNNING")
        self._write_summary()

    def _write_summary(self) -> None:
        with open(self.summary_path + ".tmp", "w") as handle:
            json.dump(self.summary, handle, indent=1, default=str)
        os.replace(self.summary_path + ".tmp", self.summary_path)

    def log_params(self, params: Dict) -> None:
        self.summary["params"].update({k: str(v) for k, v in params.items()})
        self._write_summary()

    def set_tags(self, tags: Dict[str, str]) -> None:
        self.summary["tags"].update(tags)
        self._write_summary()

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def finish(self, status: str = "FINISHED") -> None:
        self.summary["status"] = status
        self._write_summary()


def build_tracker(cfg, run_dir: str, run_name: str, is_main: bool, run_id: Optional[str] = None):
    """The configured tracker (MLflow or JSON lines) behind a :class:`QueuedTracker` (calls made off the
    training thread) on the main process when enabled, NullTracker otherwise."""
    if not (is_main and cfg.enabled):
        return NullTracker()
    from pretrain.tracking_queue import QueuedTracker

    inner = JsonlTracker(run_dir, run_name, run_id) if cfg.backend == "jsonl" else MLflowTracker(cfg, run_dir,
                                                                                                 run_name, run_id)
    return QueuedTracker(inner, cfg.queue_size)


SLURM_TAGS = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
              "SLURM_ARRAY_TASK_ID": "slurm_array_task_id", "SLURM_JOB_NODELIST": "slurm_nodelist",
              "SLURM_JOB_PARTITION": "slurm_partition", "PRETRAIN_CLUSTER_PROFILE": "cluster_profile"}
"""Environment variables (set by SLURM and by the generated sbatch script) recorded as run tags."""


def run_tags(world_size: int) -> Dict[str, str]:
    """Tags every run carries: code version, host, process count, and the SLURM job when there is one."""
    tags = {"git_commit": git_commit(), "host": socket.gethostname(), "world_size": str(world_size)}
    tags.update({tag: os.environ[var] for var, tag in SLURM_TAGS.items() if os.environ.get(var)})
    return tags


def restart_tags(step: int) -> Dict[str, str]:
    """Tags recording a requeued SLURM job's restart (SLURM_RESTART_COUNT > 0) and where it resumed."""
    count = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if not count:
        return {}
    return {"restarts": str(count),
            f"restart_{count}": f"job {os.environ.get('SLURM_JOB_ID', '?')} resumed at step {step} on "
                                f"{os.environ.get('SLURM_JOB_NODELIST', socket.gethostname())}"}
