"""``pretrain shards KIND SRC OUT --submit clusters/X.yaml --tasks K``: a conversion as a SLURM array job.

The plan is made on the submitting host (:func:`data_pipeline.conversion.prepare`: the listing of SRC, cut
into parts), so every task sees the same parts; task ``i`` of the array converts parts ``i, i+K, i+2K...``
(``pretrain shards resume OUT --task i --tasks K``) on the cores SLURM gives it, and a second job, which
starts only once every task has succeeded (``--dependency=afterok``), merges the parts into the shards and
manifest (``pretrain shards merge OUT``). A task that is killed, preempted or requeued (on the profile's
signal it requeues itself) redoes only its unfinished parts. The scripts are rendered from
``launch/templates/shards.sh`` and ``shards_merge.sh`` with the profile machinery of ``pretrain submit``
(the same quoting: shell-quoted shell lines, #SBATCH values refused when sbatch would split them) and kept
in ``OUT/.convert/slurm/``. A conversion task is a CPU job: one node, one task, the profile's
``cpus_per_task``, no GPUs, never exclusive.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import time
from typing import Optional

from launch.profiles import ClusterProfile, line_breaking, load_profile
from launch.submit import sbatch_options
from pretrain.config import ConfigError

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def cpu_profile(profile: ClusterProfile) -> ClusterProfile:
    """The profile as one conversion task uses it: one node, one process, no GPUs, not exclusive."""
    return dataclasses.replace(profile, nodes=1, processes_per_node=1, gpus_per_node=0,
                               slurm=dataclasses.replace(profile.slurm, exclusive=False))


def render(template: str, profile: ClusterProfile, profile_path: str, out: str, script: str, tasks: int,
           job_name: str, log_pattern: str) -> str:
    """One of the conversion scripts for ``profile`` and the conversion in ``out``."""
    q = shlex.quote
    values = {
        "DATE": time.strftime("%Y-%m-%d %H:%M:%S"),
        "PROFILE": os.path.abspath(profile_path),
        "OUT": out,
        "OUT_Q": q(out),
        "SCRIPT": script,
        "TASKS": str(tasks),
        "SBATCH": "\n".join(sbatch_options(profile, job_name, log_pattern, tasks)),
        "SETUP": "\n".join(profile.setup) or "# (no set-up lines)",
        "ENV": "\n".join(f"export {key}={q(str(value))}" for key, value in profile.env.items()) or "# (no variables)",
        "PYTHON": q(profile.python),
        "CONTAINER": profile.container,
        "SIGNAL": profile.slurm.signal,
        "CPUS_PER_TASK": str(profile.slurm.cpus_per_task),
    }
    with open(os.path.join(TEMPLATES, template)) as handle:
        text = handle.read()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def submit_conversion(profile_path: str, out: str, tasks: int, dry_run: bool = False) -> dict:
    """Render and (unless ``dry_run``) submit the array job converting the planned parts of ``out`` and the
    merge job after it. The plan must exist (``prepare`` first).

    Returns:
        {'scripts': [array, merge], 'texts', 'job_id', 'merge_job_id', 'parts'}.

    Raises:
        ConfigError: a bad profile, a non-SLURM one, a path that would break a script line, or sbatch refusing.
    """
    from data_pipeline.conversion import WORK, load_plan

    if tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {tasks}")
    out = os.path.abspath(out)
    for path in (profile_path, out):
        if line_breaking(path):
            raise ConfigError(f"path {path!r}: line breaks and control characters are not allowed")
    profile = load_profile(profile_path)
    if profile.scheduler != "slurm":
        raise ConfigError(f"{profile_path}: scheduler {profile.scheduler!r}; convert here with --workers instead")
    plan = load_plan(out)
    tasks = min(tasks, max(1, len(plan["parts"])))
    folder = os.path.join(out, WORK, "slurm")
    array, merge = os.path.join(folder, "convert.sbatch"), os.path.join(folder, "merge.sbatch")
    name = f"shards-{plan['kind']}-{os.path.basename(out)}"
    cpu = cpu_profile(profile)
    texts = [render("shards.sh", cpu, profile_path, out, array, tasks, name, os.path.join(folder, "%x-%A_%a.out")),
             render("shards_merge.sh", dataclasses.replace(cpu, slurm=dataclasses.replace(cpu.slurm, cpus_per_task=1)),
                    profile_path, out, merge, 1, name + "-merge", os.path.join(folder, "%x-%j.out"))]
    os.makedirs(folder, exist_ok=True)
    for path, text in zip((array, merge), texts):
        with open(path, "w") as handle:
            handle.write(text)
    result = {"scripts": [array, merge], "texts": texts, "job_id": None, "merge_job_id": None,
              "parts": len(plan["parts"]), "tasks": tasks}
    if dry_run:
        return result
    result["job_id"] = _sbatch(array)
    result["merge_job_id"] = _sbatch(merge, f"--dependency=afterok:{result['job_id']}", "--kill-on-invalid-dep=yes")
    with open(os.path.join(folder, "job_ids"), "a") as handle:
        handle.write(f"{result['job_id']} {result['merge_job_id']}\n")
    return result


def _sbatch(script: str, *options: str) -> Optional[str]:
    done = subprocess.run(["sbatch", "--parsable", *options, script], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]
