"""Two SLURM nodes on this machine (the second in a network namespace of its own, tests/slurm_cluster.py):
the rendered job runs one task per node, the ranks meet at the first node's address, the run trains, is
preempted, requeued and resumed on both nodes; preempted again and requeued onto one node, it resumes there
and finishes, in the same MLflow run."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.conftest import metric_history
from tests.slurm_cluster import LINK, running_cluster
from tests.system_deps import require
from tests.test_slurm import job_log, release_after_requeue, submit, write_profile


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    require("slurm")
    with running_cluster(str(tmp_path_factory.mktemp("slurm2")), cpus=1, nodes=2) as cluster:
        yield cluster


def wait_for_log(run_dir: str, text: str, count: int = 1, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(os.path.join(run_dir, "slurm")) and job_log(run_dir).count(text) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} x{count} not in the job's log after {timeout} s:\n{job_log(run_dir)[-3000:]}")


def preempt(cluster, job: str) -> None:
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=cluster.env)


@pytest.mark.slow
def test_a_two_node_job_trains_is_preempted_resumes_and_resumes_again_on_one_node(two_nodes, xray_shards, tmp_path):
    profile = write_profile(tmp_path, nodes=2, processes_per_node=1, env={"GLOO_SOCKET_IFNAME": LINK})
    steps = 300
    job = submit(profile, "name=two-nodes", f"data.shards={xray_shards}", f"train.steps={steps}",
                 "checkpoint.every=1000", "train.log_every=1", "train.image_every=0", "tracking.system_metrics=false",
                 "distributed.zero_stage=2", "data.split_by=sample")
    run_dir = str(tmp_path / "runs" / "two-nodes")
    wait_for_log(run_dir, "step 10 loss")
    log = job_log(run_dir)
    assert "on ptnode[1-2]" in log and f"via {two_nodes.nodes[0][1]}:" in log, log[-3000:]
    assert "world 2" in log
    preempt(two_nodes, job)
    release_after_requeue(two_nodes, job)
    wait_for_log(run_dir, "resumed from", 1)
    wait_for_log(run_dir, "loss", job_log(run_dir).count("loss") + 10)  # trains on after the resume
    preempt(two_nodes, job)
    shrink = ["scontrol", "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=1"]  # the cluster gives 1
    release_after_requeue(two_nodes, job, before=lambda: subprocess.run(shrink, check=True, env=two_nodes.env))
    info = two_nodes.wait(job, timeout=400)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-4000:]
    assert log.count("[rank 0] pretrain.trainer: resumed from") == 2 and "restart 2 on ptnode1:" in log, log[-4000:]
    assert "world 1" in log and "resuming a stream saved by 2 process(es) x 1 reader(s) on 1 x 1" in log
    events = open(os.path.join(run_dir, "slurm", "events.log")).read()
    assert events.count("requeued (restart") == 2 and "run finished" in events
    assert [step for step, _ in metric_history(run_dir)] == list(range(1, steps + 1))
