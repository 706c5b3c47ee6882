"""Helpers the generated sbatch script calls inside a job (``python -m launch.slurm_job ...``).

    run-dir CONFIG             print the run folder of a run config
    last-step RUN_DIR          print the step of the newest complete checkpoint (0 if none)
    after-run RUN_DIR ...      decide, after srun ended, whether to requeue the job, and do it

The decision (:func:`decide`) is a pure function: a finished run ends the job; a run stopped
by the preemption / time-limit signal (exit 0 with the ``STOPPED`` marker in the run folder,
checkpoint written) is requeued; a crash after progress (a newer checkpoint than at the start) is requeued; a crash
without progress counts as a failed start, and after ``max_startup_failures`` of them in a
row the job is not requeued again. Requeues are bounded by ``max_requeues`` in total. Every
decision is appended to ``<run>/slurm/events.log``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

@dataclass
class Decision:
    """What to do after a job's training step ended."""

    requeue: bool
    reason: str
    startup_failures: int
    exit_code: int


def decide(status: int, stopped: bool, start_step: int, end_step: int, restarts: int, startup_failures: int,
           max_requeues: int, max_startup_failures: int) -> Decision:
    """Requeue or not, from srun's exit status and the checkpoints before and after.

    Args:
        status: srun's exit code (0: finished or stopped on the signal; other: a crash).
        stopped: the run left the STOPPED marker (it checkpointed on the signal).
        start_step, end_step: step of the newest complete checkpoint before and after the run.
        restarts: SLURM_RESTART_COUNT of this job.
        startup_failures: failed starts in a row before this one.
    """
    if status == 0 and not stopped:
        return Decision(False, "run finished", 0, 0)
    progressed = end_step > start_step
    if (status == 0 and stopped) or progressed:
        failures = 0
        why = "stopped on the preemption/time-limit signal" if status == 0 else (
            f"crashed (exit {status}) after progress to step {end_step}")
    else:
        failures = startup_failures + 1
        why = f"failed to start (exit {status}, no checkpoint after step {start_step}); failed start {failures}"
        if failures >= max_startup_failures:
            return Decision(False, f"{why}: giving up after {failures} failed starts in a row", failures, status)
    if restarts >= max_requeues:
        return Decision(False, f"{why}: not requeued, {restarts} requeues already (max {max_requeues})", failures,
                        status or 1)
    return Decision(True, f"{why}: requeued (restart {restarts + 1})", failures, 0)


def last_step(run_dir: str) -> int:
    """Step of the newest complete checkpoint of a run folder (0 when none)."""
    from pretrain import checkpoint

    latest = checkpoint.find_latest(os.path.join(run_dir, "checkpoints"))
    return int(os.path.basename(latest).split("_")[1]) if latest else 0


def _events(run_dir: str, line: str) -> None:
    folder = os.path.join(run_dir, "slurm")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "events.log"), "a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id()}: {line}\n")


def job_id() -> str:
    """This job's id as scontrol wants it (array tasks: ARRAYJOB_TASK)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "?")


def after_run(run_dir: str, status: int, start_step: int, max_requeues: int, max_startup_failures: int) -> int:
    """Apply :func:`decide`; returns the batch script's exit code."""
    counter = os.path.join(run_dir, "slurm", "startup_failures")
    failures = int(open(counter).read().strip() or 0) if os.path.isfile(counter) else 0
    from pretrain.trainer import STOPPED_MARKER

    stopped = os.path.isfile(os.path.join(run_dir, STOPPED_MARKER))
    decision = decide(status, stopped, start_step, last_step(run_dir),
                      int(os.environ.get("SLURM_RESTART_COUNT", 0)), failures, max_requeues, max_startup_failures)
    os.makedirs(os.path.dirname(counter), exist_ok=True)
    with open(counter, "w") as handle:
        handle.write(f"{decision.startup_failures}\n")
    _events(run_dir, decision.reason)
    print(decision.reason, flush=True)
    if decision.requeue:
        subprocess.run(["scontrol", "requeue", job_id()], check=True)
    return decision.exit_code


def main(argv=None) -> int:
    """Entry point for the sbatch script."""
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_job", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run-dir").add_argument("config")
    commands.add_parser("last-step").add_argument("run_dir")
    after = commands.add_parser("after-run")
    after.add_argument("run_dir")
    after.add_argument("--status", type=int, required=True)
    after.add_argument("--start-step", type=int, required=True)
    after.add_argument("--max-requeues", type=int, required=True)
    after.add_argument("--max-startup-failures", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "run-dir":
        from pretrain.config import load_config

        print(os.path.abspath(load_config(args.config).run_dir))
    elif args.command == "last-step":
        print(last_step(args.run_dir))
    else:
        return after_run(args.run_dir, args.status, args.start_step, args.max_requeues, args.max_startup_failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
