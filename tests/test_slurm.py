"""Cluster operations against a real SLURM controller and node daemon on this machine: profiles, the
rendered sbatch script, 2-task jobs with SLURM rendezvous, preemption -> checkpoint -> requeue -> resume in
the same MLflow run, bounded requeues of a job that cannot start, and `pretrain status`."""
import os
import shlex
import subprocess
import sys
import time

import pytest
import yaml

from launch.profiles import load_profile
from launch.slurm_job import decide
from pretrain.config import ConfigError
from tests.conftest import REPO, TINY, run_pretrain
from tests.slurm_cluster import running_cluster
from tests.system_deps import require

MAE_TINY = os.path.join(REPO, "pretrain", "configs", "mae_tiny_cpu.yaml")


def test_requeue_decisions():
    assert not decide(0, False, 0, 10, 0, 0, 5, 3).requeue
    preempted = decide(0, True, 4, 6, 0, 2, 5, 3)
    assert preempted.requeue and preempted.startup_failures == 0 and "preemption" in preempted.reason
    assert decide(1, False, 4, 8, 1, 0, 5, 3).requeue  # a crash after progress (node failure): requeue
    first = decide(2, False, 4, 4, 0, 0, 5, 2)
    assert first.requeue and first.startup_failures == 1
    last = decide(2, False, 4, 4, 1, 1, 5, 2)
    assert not last.requeue and "giving up after 2 failed starts" in last.reason and last.exit_code == 2
    assert not decide(0, True, 4, 6, 5, 0, 5, 3).requeue  # max_requeues reached


def test_profiles_are_validated_and_the_examples_load(tmp_path):
    example = load_profile(os.path.join(REPO, "clusters", "example_slurm.yaml"))
    assert example.scheduler == "slurm" and example.world_size == 16 and example.env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert load_profile(os.path.join(REPO, "clusters", "local.yaml")).scheduler == "local"
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: slurm\nslurm:\n  partiton: gpu\n")
    with pytest.raises(ConfigError, match="bad.yaml.*slurm.partiton"):
        load_profile(str(bad))
    bad.write_text("scheduler: slurm\nprocesses_per_node: 8\ngpus_per_node: 4\nslurm:\n  time_limit: two days\n")
    with pytest.raises(ConfigError, match="exceeds gpus_per_node=4.*time_limit"):
        load_profile(str(bad))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on 127.0.0.1, SLURM_CONF exported for the test's clients."""
    require("slurm")
    with running_cluster(str(tmp_path_factory.mktemp("slurm"))) as cluster:
        yield cluster


def write_profile(tmp_path, name="test-node", env=None, nodes=1, processes_per_node=2, **slurm) -> str:
    profile = {
        "name": name, "scheduler": "slurm", "nodes": nodes, "processes_per_node": processes_per_node,
        "python": sys.executable,
        "setup": [f"cd {REPO}"], "env": {"OMP_NUM_THREADS": "1", **(env or {})},
        "paths": {"runs": str(tmp_path / "runs")},
        "slurm": {"partition": "debug", "cpus_per_task": 1, "time_limit": "00:15:00", "grace_seconds": 30,
                  "max_startup_failures": 2, **slurm},
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def submit(profile, *overrides, extra=()) -> str:
    result = run_pretrain(["submit", "--cluster", profile, "--config", MAE_TINY, *extra, *TINY, *overrides])
    return result.stdout.split("submitted job ")[1].split(":")[0]


def job_log(run_dir: str) -> str:
    logs = [name for name in os.listdir(os.path.join(run_dir, "slurm")) if name.endswith(".out")]
    return "".join(open(os.path.join(run_dir, "slurm", name)).read() for name in logs)


def release_after_requeue(slurm, job: str, timeout: float = 240, before=None) -> None:
    """Wait until the job is back in the queue after its requeue and its node is idle, then make it eligible
    at once: SLURM holds a requeued batch job for about 2 minutes (EligibleTime), which a test need not
    spend. Not too soon either: a launch within the second of the requeue is refused ("Job credential
    revoked": credentials are timed in seconds) and fails the job. ``before()`` runs just before the release
    (the job is out of its node: what it wrote is complete)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = slurm.job(job)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=slurm.env, capture_output=True, text=True)
        idle = set(nodes.stdout.split()) == {"idle"}
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= 1 and idle:
            time.sleep(3)
            if before is not None:
                before()
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, check=True)
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job} was not requeued within {timeout} s: {slurm.job(job)}")


def test_the_example_multi_node_profile_renders_its_directives(tmp_path):
    result = run_pretrain(["submit", "--cluster", os.path.join(REPO, "clusters", "example_slurm.yaml"), "--config",
                           MAE_TINY, "--dry-run", f"output_dir={tmp_path}", "name=big"])
    script = result.stdout
    for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=0",
                      "--partition=gpu", "--account=medical-ml", "--qos=normal", "--constraint=h100",
                      "--time=48:00:00", "--signal=B:USR1@600", "--requeue", "--exclusive", "--job-name=big"):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "module load cuda/12.4\n" in script and "export NCCL_SOCKET_IFNAME=ib0\n" in script
    assert 'FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert 'export MASTER_ADDR=$(scontrol show node "$FIRST_NODE" -o' in script
    assert os.path.isfile(tmp_path / "big" / "slurm" / "job.sbatch")


def test_hostile_profile_values_are_quoted_or_refused(tmp_path):
    canary = tmp_path / "INJECTED"
    hostile = f"x'; touch {canary}; echo '\"$(touch {canary})`touch {canary}`"
    profile = write_profile(tmp_path, name=hostile, env={"EVIL": hostile})
    result = run_pretrain(["submit", "--cluster", profile, "--config", MAE_TINY, "--dry-run",
                           "name=run$(>INJECTED)`>INJECTED`"])
    script = (tmp_path / "runs" / "run$(>INJECTED)`>INJECTED`" / "slurm" / "job.sbatch").read_text()
    assert script == result.stdout.rstrip("\n") + "\n"
    assert "#SBATCH --job-name=run___INJECTED___INJECTED_\n" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    environment = script[script.index("# --- environment"):script.index("# --- rendezvous")]
    shown = subprocess.run(["bash", "-c", environment + 'printf "%s|%s|%s" "$EVIL" "$PRETRAIN_CLUSTER_PROFILE" '
                            '"$CONFIG"'], capture_output=True, text=True, cwd=tmp_path)
    evil, name, config = shown.stdout.split("|", 2)
    assert (evil, name) == (hostile, hostile) and config.endswith("INJECTED`/slurm/config.yaml")
    assert not canary.exists() and not (tmp_path / "INJECTED").exists()
    refusals = [({"name": "a\nb"}, "line breaks"), ({"env": {"OK": "line\nbreak"}}, "line breaks"),
                ({"env": {"NOT-A-NAME": "1"}}, "shell variable name"),
                ({"partition": "gpu; touch x"}, "#SBATCH values cannot hold whitespace"),
                ({"extra_options": ["--comment=two words"]}, "#SBATCH values cannot hold whitespace")]
    from launch.submit import submit as submit_job

    for bad, why in refusals:  # in process: the CLI's mapping of ConfigError to exit 2 is tested below
        kwargs = {key: bad[key] for key in ("name", "env") if key in bad}
        slurm_values = {key: value for key, value in bad.items() if key not in ("name", "env")}
        with pytest.raises(ConfigError, match=why):
            submit_job(write_profile(tmp_path, **kwargs, **slurm_values), MAE_TINY, [], [], dry_run=True)
    spaced = run_pretrain(["submit", "--cluster", profile, "--config", MAE_TINY, "--dry-run", "name=two words"],
                          check=False)
    assert spaced.returncode == 2 and "#SBATCH values cannot hold whitespace" in spaced.stderr
    assert not canary.exists()


@pytest.mark.slow
def test_dry_run_prints_a_quoted_script_that_sbatch_accepts(slurm, tmp_path):
    profile = write_profile(tmp_path, extra_options=["--comment=pretrain-test"])
    result = run_pretrain(["submit", "--cluster", profile, "--config", MAE_TINY, "--dry-run", "name=dry-run"])
    script = result.stdout
    assert "#SBATCH --partition=debug" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --signal=B:USR1@30" in script and "#SBATCH --comment=pretrain-test" in script
    run_dir = tmp_path / "runs" / "dry-run"
    assert f"CONFIGS=({shlex.quote(str(run_dir / 'slurm' / 'config.yaml'))})" in script
    saved = yaml.safe_load((run_dir / "slurm" / "config.yaml").read_text())
    assert saved["train"]["stop_signal"] == "USR1" and saved["output_dir"] == str(tmp_path / "runs")
    check = subprocess.run(["sbatch", "--test-only", str(run_dir / "slurm" / "job.sbatch")], capture_output=True,
                           text=True, env=slurm.env)
    assert check.returncode == 0, check.stderr
    wrong = write_profile(tmp_path, partition="nosuchpartition")
    refused = run_pretrain(["submit", "--cluster", wrong, "--config", MAE_TINY], check=False)
    assert refused.returncode == 2 and "sbatch refused" in refused.stderr


@pytest.mark.slow
def test_array_sweep_renders_one_config_per_combination(slurm, tmp_path):
    profile = write_profile(tmp_path)
    run_pretrain(["submit", "--cluster", profile, "--config", MAE_TINY, "--dry-run", "--array", "optim.lr=1e-3,3e-4",
                  "--array", "seed=0,1", "name=sweep"])
    folder = tmp_path / "runs" / "sweep" / "slurm"
    configs = sorted(folder.glob("config_*.yaml"))
    assert len(configs) == 4
    values = {(c["optim"]["lr"], c["seed"], c["name"]) for c in (yaml.safe_load(p.read_text()) for p in configs)}
    assert values == {(1e-3, 0, "sweep_000"), (1e-3, 1, "sweep_001"), (3e-4, 0, "sweep_002"), (3e-4, 1, "sweep_003")}
    assert "#SBATCH --array=0-3" in (folder / "job.sbatch").read_text()


def server_run(server: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server)
    (run,) = client.search_runs(client.get_experiment_by_name(experiment).experiment_id)
    return client, run


@pytest.mark.slow
def test_job_runs_two_ranks_from_the_slurm_environment_and_tags_mlflow(slurm, mlflow_server, xray_shards, tmp_path):
    canary = tmp_path / "INJECTED"
    hostile = f"node \"$(touch {canary})\" 'x'"  # a profile name that must arrive as text, never run
    profile = write_profile(tmp_path, name=hostile)
    job = submit(profile, "name=plain$(>INJECTED)", f"data.shards={xray_shards}", "train.steps=4",
                 "checkpoint.every=2", "tracking.system_metrics_interval=0.2", f"tracking.uri={mlflow_server}",
                 "tracking.experiment=slurm-plain", "distributed.zero_stage=2")
    info = slurm.wait(job)
    run_dir = str(tmp_path / "runs" / "plain$(>INJECTED)")
    assert info["JobState"] == "COMPLETED", job_log(run_dir)
    assert "ZeRO-2, fp32, world 2" in job_log(run_dir) and not canary.exists()
    assert not os.path.exists(os.path.join(REPO, "INJECTED"))
    client, run = server_run(mlflow_server, "slurm-plain")
    tags = run.data.tags
    assert tags["slurm_job_id"] == job and tags["cluster_profile"] == hostile and tags["world_size"] == "2"
    assert tags["slurm_nodelist"] and tags["git_commit"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert any(key.startswith("system/cpu") for key in run.data.metrics), sorted(run.data.metrics)
    status = run_pretrain(["status", run_dir]).stdout
    assert f"job       {job}: COMPLETED" in status and "step      4" in status
    assert f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in status


def damage_two_newest(checkpoints: str) -> tuple:
    """Truncate the largest file of the newest checkpoint in ``checkpoints`` (a shared filesystem that lost
    its tail) and flip a byte in the middle of the largest file of the one before (a failing disk: same size);
    returns (newest, the one before, the one before that)."""
    from pretrain import integrity

    steps = sorted(name for name in os.listdir(checkpoints) if name.startswith("step_"))
    newest, before = (os.path.join(checkpoints, name) for name in steps[-2:][::-1])
    largest = {folder: max((os.path.join(folder, rel) for rel in integrity.listing(folder)), key=os.path.getsize)
               for folder in (newest, before)}
    with open(largest[newest], "r+b") as handle:
        handle.truncate(os.path.getsize(largest[newest]) // 2)
    with open(largest[before], "r+b") as handle:
        handle.seek(os.path.getsize(largest[before]) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return steps[-1], steps[-2], steps[-3]


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_the_same_run(slurm, mlflow_server, xray_shards, tmp_path):
    """Preempted after step 20, the job writes a checkpoint on the signal (from a host copy in the background)
    and is requeued; the test then cuts that checkpoint's largest file in half and flips a byte in the periodic
    one before it, and the requeued job (verifying checksums) passes over both and resumes from the one before
    them, in the same MLflow run, logging the steps after it again."""
    profile = write_profile(tmp_path)
    steps = 400
    job = submit(profile, "name=preempted", f"data.shards={xray_shards}", f"train.steps={steps}",
                 "checkpoint.every=10", "train.log_every=1", "train.image_every=0", "tracking.system_metrics=false",
                 f"tracking.uri={mlflow_server}", "tracking.experiment=slurm-preempted", "distributed.zero_stage=2",
                 "checkpoint.writer=background", "checkpoint.verify=checksum", "checkpoint.keep_last=3")
    run_dir = str(tmp_path / "runs" / "preempted")
    deadline = time.time() + 180
    while time.time() < deadline and "step 20 loss" not in (job_log(run_dir) if os.path.isdir(
            os.path.join(run_dir, "slurm")) else ""):
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm.env)
    damaged = []
    checkpoints = os.path.join(run_dir, "checkpoints")
    release_after_requeue(slurm, job, before=lambda: damaged.extend(damage_two_newest(checkpoints)))
    info = slurm.wait(job, timeout=400)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    events = open(os.path.join(run_dir, "slurm", "events.log")).read()
    assert "stopped on the preemption/time-limit signal: requeued (restart 1)" in events
    assert "run finished" in events
    (newest, flipped, previous), preempted_at = damaged, int(damaged[0].split("_")[1])
    assert preempted_at > 20, damaged  # the checkpoint written on the signal
    assert f"passing over checkpoint {os.path.join(run_dir, 'checkpoints', newest)}" in log
    assert f"passing over checkpoint {os.path.join(run_dir, 'checkpoints', flipped)}" in log
    assert "does not match the checksum written with it" in log
    client, run = server_run(mlflow_server, "slurm-preempted")  # one MLflow run
    resumed_step = int(previous.split("_")[1])
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(logged) == sorted(list(range(1, steps + 1)) + list(range(resumed_step + 1, preempted_at + 1)))
    assert run.data.tags["restarts"] == "1" and f"resumed at step {resumed_step}" in run.data.tags["restart_1"]
    assert run.data.tags["resumed_from"] == previous and run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_job_that_cannot_start_gives_up_after_bounded_requeues(slurm, tmp_path):
    profile = write_profile(tmp_path, max_startup_failures=2)
    missing = str(tmp_path / "nowhere-{000000..000001}.tar")
    job = submit(profile, "name=broken", f"data.shards={missing}")
    run_dir = str(tmp_path / "runs" / "broken")
    release_after_requeue(slurm, job)
    info = slurm.wait(job, states=("FAILED", "COMPLETED"), timeout=300)
    events = open(os.path.join(run_dir, "slurm", "events.log")).read().splitlines()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", (events, job_log(run_dir)[-3000:], info)
    assert "failed start 1: requeued" in events[0] and "giving up after 2 failed starts" in events[1]
    assert "nowhere-000000.tar: shard not found" in job_log(run_dir)
