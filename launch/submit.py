"""``pretrain submit``: a cluster profile + a run config -> a readable sbatch script -> ``sbatch``.

The script is rendered from ``launch/templates/sbatch.sh`` (values in shell lines are
shell-quoted; values in #SBATCH lines, which sbatch parses itself, may not hold whitespace or
quotes; anything that could break a line is refused), written with the resolved run
config(s) into the run folder's ``slurm/`` (a sweep's into ``<runs>/<name>/slurm/``), and
submitted with ``sbatch --parsable`` (``--dry-run`` prints it instead). ``--array key=v1,v2``
(repeatable) submits one array task per combination of values, each a run of its own named
``<name>_<index>``.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import time
from typing import List, Optional

from launch.profiles import ClusterProfile, line_breaking, load_profile
from pretrain.config import ConfigError, load_config, to_yaml

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "sbatch.sh")


def expand_sweep(arrays: List[str]) -> List[List[str]]:
    """``["a=1,2", "b=x,y"]`` -> every combination as override lists (``[[]]`` for no sweep)."""
    axes = []
    for item in arrays:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--array {item!r} is not of the form key=value1,value2,...")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


_SBATCH_UNSAFE = re.compile(r"[\s'\"\\]")


def sbatch_value(name: str, value) -> str:
    """A value for an #SBATCH line. sbatch splits those lines at whitespace and keeps quotes (measured:
    ``--output='/a b/x'`` became ``/a``), so shell quoting cannot protect them: such values are refused.

    Raises:
        ConfigError: naming the option and the value.
    """
    text = str(value)
    if _SBATCH_UNSAFE.search(text):
        raise ConfigError(f"--{name}={text!r}: #SBATCH values cannot hold whitespace, quotes or backslashes "
                          "(sbatch splits and keeps them)")
    return text


def sbatch_options(profile: ClusterProfile, job_name: str, log_pattern: str, tasks: int) -> List[str]:
    """The #SBATCH lines of a profile (job name reduced to letters, digits, '.', '_' and '-')."""
    s = profile.slurm
    options = [("job-name", re.sub(r"[^A-Za-z0-9._-]", "_", job_name)), ("nodes", profile.nodes),
               ("ntasks-per-node", profile.processes_per_node), ("cpus-per-task", s.cpus_per_task),
               ("mem", s.mem), ("time", s.time_limit), ("output", log_pattern),
               ("signal", f"B:{s.signal}@{s.grace_seconds}")]
    options += [(name, value) for name, value in (("partition", s.partition), ("account", s.account),
                                                  ("qos", s.qos), ("constraint", s.constraint)) if value]
    if profile.gpus_per_node:
        options.append(("gpus-per-node", profile.gpus_per_node))
    if tasks > 1:
        options.append(("array", f"0-{tasks - 1}"))
    lines = [f"#SBATCH --{name}={sbatch_value(name, value)}" for name, value in options]
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += ["#SBATCH --exclusive"] if s.exclusive else []
    lines += [f"#SBATCH {sbatch_value('extra_options', option)}" for option in s.extra_options]
    return lines


def render(profile: ClusterProfile, profile_path: str, config_paths: List[str], script_path: str,
           job_name: str, log_pattern: str) -> str:
    """The sbatch script text for a profile and resolved run configs (one per array task)."""
    q = shlex.quote
    values = {
        "DATE": time.strftime("%Y-%m-%d %H:%M:%S"),
        "PROFILE": os.path.abspath(profile_path),
        "CONFIGS": " ".join(config_paths),
        "SCRIPT": script_path,
        "SBATCH": "\n".join(sbatch_options(profile, job_name, log_pattern, len(config_paths))),
        "SETUP": "\n".join(profile.setup) or "# (no set-up lines)",
        "ENV": "\n".join(f"export {key}={q(str(value))}" for key, value in profile.env.items()) or "# (no variables)",
        "PROFILE_NAME": q(profile.name),
        "CONFIG_LIST": " ".join(q(path) for path in config_paths),
        "PYTHON": q(profile.python),
        "CONTAINER": profile.container,
        "SIGNAL": profile.slurm.signal,
        "CPUS_PER_TASK": str(profile.slurm.cpus_per_task),
        "TASKS_PER_NODE": str(profile.processes_per_node),
        "MAX_REQUEUES": str(profile.slurm.max_requeues),
        "MAX_STARTUP_FAILURES": str(profile.slurm.max_startup_failures),
    }
    with open(TEMPLATE) as handle:
        text = handle.read()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def worker_warnings(configs: list, profile: ClusterProfile) -> List[str]:
    """Runs whose data-loader workers (plus the training thread) need more cores than each task gets."""
    cores = profile.slurm.cpus_per_task
    return [f"{cfg.name}: data.num_workers={cfg.data.num_workers} per rank plus its training thread need "
            f"{cfg.data.num_workers + 1} cores; slurm.cpus_per_task={cores} gives each rank {cores}: workers "
            "would share cores (lower data.num_workers or raise cpus_per_task)"
            for cfg in configs if cfg.data.num_workers + 1 > cores]


def plan_warnings(configs: list, profile: ClusterProfile) -> List[str]:
    """The planner's verdict for each run that would not fit its GPUs, or whose loader would need more CPU cores
    per GPU than the profile gives (submission goes on: warnings)."""
    from pretrain.plan import GiB, build_plan

    warnings = []
    for cfg in configs:
        plan = build_plan(cfg, profile, deepspeed_estimates=False)
        if not plan["fits"]:
            warnings.append(f"{cfg.name}: the plan needs {plan['total'] / GiB:.1f} GiB per GPU of "
                            f"{profile.gpu_memory_gb} GB; largest micro-batch that fits: "
                            f"{plan['largest_micro_batch']} (see `pretrain plan`)")
        loader = plan["loader"]
        if loader.get("enough") is False:
            warnings.append(f"{cfg.name}: the loader needs {loader['cores_needed']:.1f} CPU cores per GPU for "
                            f"{loader['needed_samples_per_s']:.0f} samples/s at MFU {loader['mfu']:g}, the profile "
                            f"gives {loader['cores_available']} (see `pretrain plan` for the levers)")
    return warnings


def submit(profile_path: str, config_path: Optional[str], overrides: List[str], arrays: List[str],
           dry_run: bool = False) -> dict:
    """Render, write and (unless ``dry_run``) submit a job.

    Returns:
        {'script', 'text', 'job_id', 'runs', 'warnings'}: the planner's warnings are in 'warnings'.

    Raises:
        ConfigError: a bad profile, run config, override or sweep (checked before anything is written).
            Also when sbatch refuses the script (its message included: bad partition, impossible resources).
    """
    if line_breaking(profile_path):
        raise ConfigError(f"profile path {profile_path!r}: line breaks and control characters are not allowed")
    profile = load_profile(profile_path)
    if profile.scheduler != "slurm":
        raise ConfigError(f"{profile_path}: scheduler {profile.scheduler!r}; use `pretrain train --cluster` for it")
    fixed = [f"output_dir={profile.paths.runs}", f"train.stop_signal={profile.slurm.signal}",
             f"train.peak_tflops={profile.gpu_peak_tflops}"]
    base = load_config(config_path, [*fixed, *overrides])
    sweep = expand_sweep(arrays)
    configs = [base] if sweep == [[]] else [
        load_config(config_path, [*fixed, *overrides, *combo,
                                  f"name={base.name}_{index:03d}"]) for index, combo in enumerate(sweep)]
    for cfg in configs:  # the run folder and name appear in the script (quoted, but one line each)
        if line_breaking(cfg.run_dir):
            raise ConfigError(f"run folder {cfg.run_dir!r}: line breaks and control characters are not allowed")
    folder = os.path.abspath(os.path.join(base.run_dir, "slurm"))
    config_paths = [os.path.join(folder, "config.yaml" if len(configs) == 1 else f"config_{index:03d}.yaml")
                    for index in range(len(configs))]
    script = os.path.join(folder, "job.sbatch")
    log_pattern = os.path.join(folder, "%x-%j.out" if len(configs) == 1 else "%x-%A_%a.out")
    text = render(profile, profile_path, config_paths, script, base.name, log_pattern)  # may refuse values
    os.makedirs(folder, exist_ok=True)
    for path, cfg in zip(config_paths, configs):
        with open(path, "w") as handle:
            handle.write(to_yaml(cfg))
    with open(script, "w") as handle:
        handle.write(text)
    result = {"script": script, "text": text, "job_id": None, "runs": [os.path.abspath(c.run_dir) for c in configs],
              "warnings": worker_warnings(configs, profile) + plan_warnings(configs, profile)}
    if dry_run:
        return result
    done = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {done.stderr.strip()}")
    result["job_id"] = done.stdout.strip().split(";")[0]
    with open(os.path.join(folder, "job_ids"), "a") as handle:
        handle.write(f"{result['job_id']}\n")
    return result
