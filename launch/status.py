"""``pretrain status RUN_DIR``: where a run stands: SLURM job state, last step and checkpoint, MLflow run."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional

from pretrain import checkpoint


def job_ids(run_dir: str) -> List[str]:
    """The SLURM job ids submitted for a run (``slurm/job_ids``, newest last)."""
    path = os.path.join(run_dir, "slurm", "job_ids")
    if not os.path.isfile(path):
        return []
    return [line.strip() for line in open(path) if line.strip()]


def job_state(job_id: str) -> str:
    """The job's state: squeue (queued or running), scontrol (recently ended), then sacct (accounting, or
    the job-completion file with ``-c``); 'unknown' where SLURM has no answer."""
    queries = [
        ["squeue", "-h", "-j", job_id, "-o", "%T %M %R"],
        ["scontrol", "show", "job", "-o", job_id],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Elapsed,ExitCode"],
        ["sacct", "-c", "-n", "-X", "-P", "-j", job_id, "-o", "State,Elapsed,ExitCode"],
    ]
    for query in queries:
        if not shutil.which(query[0]):
            continue
        out = subprocess.run(query, capture_output=True, text=True)
        text = out.stdout.strip()
        if out.returncode != 0 or not text:
            continue
        if query[0] == "scontrol":
            fields = dict(item.partition("=")[::2] for item in text.split())
            return (f"{fields.get('JobState', '?')} (exit {fields.get('ExitCode', '?')}, "
                    f"restarts {fields.get('Restarts', '0')}, {fields.get('RunTime', '?')})")
        return text.splitlines()[-1].replace("|", " ")
    return "unknown (no answer from squeue, scontrol or sacct)"


def mlflow_run(run_dir: str, latest: Optional[str]) -> str:
    """The MLflow run of the newest checkpoint: its id and where to look at it."""
    if latest is None:
        return "no checkpoint yet"
    import torch

    from pretrain.config import load_config
    from pretrain.tracking import StoredRun, tracking_uri

    state = torch.load(os.path.join(latest, "trainer_state_rank0.pt"), weights_only=False)
    run_id = state.get("mlflow_run_id")
    if not run_id:
        return "not tracked"
    uri = tracking_uri(load_config(os.path.join(latest, "config.yaml")).tracking, run_dir)
    if uri.startswith("http"):
        return StoredRun(uri, run_id).web_address()
    return f"{run_id} in {uri} (view: mlflow ui --backend-store-uri {uri})"


def run_status(run_dir: str) -> str:
    """A few lines describing the run folder."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    latest = checkpoint.find_latest(os.path.join(run_dir, "checkpoints"))
    lines = [f"run       {os.path.abspath(run_dir)}"]
    ids = job_ids(run_dir)
    lines.append(f"job       {ids[-1]}: {job_state(ids[-1])}" if ids else "job       none submitted from this folder")
    lines.append(f"step      {checkpoint.completed_step(latest) if latest else 0}")
    lines.append(f"checkpoint {latest or 'none'}")
    events = os.path.join(run_dir, "slurm", "events.log")
    if os.path.isfile(events):
        lines.append("events    " + "\n          ".join(open(events).read().strip().splitlines()[-5:]))
    lines.append(f"mlflow    {mlflow_run(run_dir, latest)}")
    return "\n".join(lines)
