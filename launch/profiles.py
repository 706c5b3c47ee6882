"""Cluster profiles: data, not code. One YAML per machine or cluster in ``clusters/``.

A profile says where and how jobs run: the scheduler (``local`` for a workstation,
``slurm`` for a cluster), nodes and processes (GPUs) per node, SLURM resources and the
preemption signal, the environment set-up lines (modules, conda, a container), NCCL and
network variables, and the paths for data, runs and logs. Profiles are validated like
run configs: unknown keys, wrong types and impossible values are errors naming the file.
Values are shell-quoted where the sbatch script uses them in shell lines (#SBATCH values are
checked by launch/submit.py); text that could break a line of the script (newlines, control
characters) and env names that are not shell names are refused.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Dict, List

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError


@dataclass
class SlurmConfig:
    """What ``pretrain submit`` asks SLURM for."""

    partition: str = ""
    """Partition (empty: the cluster's default)."""
    account: str = ""
    """Account to charge (empty: the user's default)."""
    qos: str = ""
    """Quality of service (empty: default)."""
    time_limit: str = "24:00:00"
    """Wall-clock limit per job (HH:MM:SS or D-HH:MM:SS); a job that reaches it is requeued from its checkpoint."""
    constraint: str = ""
    """Node features required (e.g. a100|h100)."""
    cpus_per_task: int = 8
    """CPU cores per training process (data-loader workers live here)."""
    mem: str = "0"
    """Memory per node (e.g. 500G); 0 = all of it."""
    exclusive: bool = False
    """Whole nodes only."""
    extra_options: List[str] = field(default_factory=list)
    """More #SBATCH options, each written as given (e.g. --reservation=ml)."""
    signal: str = "USR1"
    """Signal SLURM sends before the time limit or a preemption; the trainer checkpoints on it."""
    grace_seconds: int = 300
    """Seconds before the end at which the signal comes (covers one step + one checkpoint)."""
    max_requeues: int = 50
    """Requeues allowed in total (preemptions, time limits, node failures)."""
    max_startup_failures: int = 3
    """Failed starts in a row (no new checkpoint) after which the job is not requeued again."""


@dataclass
class PathsConfig:
    """Shared-filesystem locations on the cluster."""

    data: str = ""
    """Where shards live (informational; run configs name their shards)."""
    runs: str = "runs"
    """output_dir of submitted runs: run folders, checkpoints, sbatch scripts and job logs go here."""


@dataclass
class ClusterProfile:
    """A workstation or cluster."""

    name: str = "local"
    """Profile name (tagged on every MLflow run launched with it)."""
    scheduler: str = "local"
    """local (torchrun on this machine) or slurm (sbatch + srun)."""
    nodes: int = 1
    """Nodes per job."""
    processes_per_node: int = 1
    """Training processes per node: one per GPU (a few on a CPU)."""
    gpus_per_node: int = 0
    """GPUs to request per node (0 on CPU-only machines)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GB, the budget of `pretrain plan` (on a CPU machine: RAM per process)."""
    gpu_peak_tflops: float = 0.0
    """Dense bf16 peak of one GPU in TFLOP/s (H100/H200 SXM: 989, A100: 312): runs log their MFU against it
    (0 = not stated: no MFU metric)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment for the training processes: NCCL_*, network interfaces, OMP_NUM_THREADS..."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before training: module load, conda activate, cd..."""
    container: str = ""
    """Command prefix running training in a container (e.g. 'apptainer exec --nv -B /data img.sif'); empty = none."""
    python: str = "python"
    """The Python that has this project installed (inside the container if there is one)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def world_size(self) -> int:
        """Training processes per job."""
        return self.nodes * self.processes_per_node


_TIME = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$|^\d+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def line_breaking(value: str) -> bool:
    """True for text that could end a line of the generated script (newline, carriage return, NUL...)."""
    return bool(_CONTROL.search(value))


def _text_values(node, prefix: str = ""):
    """(key, string) pairs of every string in a profile, recursively."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _text_values(value, f"{prefix}{key}.")
            if isinstance(key, str):
                yield f"{prefix}{key} (name)", key
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _text_values(value, f"{prefix}{index}.")
    elif isinstance(node, str):
        yield prefix.rstrip("."), node


def load_profile(path: str) -> ClusterProfile:
    """Read and check a cluster profile; errors name the file and the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"cluster profile not found: {path}")
    try:
        profile = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterProfile), OmegaConf.load(path)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: bad profile key {getattr(exc, 'full_key', None)!r}: {exc}") from None
    problems = []
    if profile.scheduler not in ("local", "slurm"):
        problems.append(f"scheduler={profile.scheduler!r} is not one of ['local', 'slurm']")
    if profile.nodes < 1 or profile.processes_per_node < 1:
        problems.append("nodes and processes_per_node must be at least 1")
    if profile.scheduler == "local" and profile.nodes != 1:
        problems.append("a local profile has nodes: 1")
    if profile.gpus_per_node and profile.gpus_per_node < profile.processes_per_node:
        problems.append(f"processes_per_node={profile.processes_per_node} exceeds "
                        f"gpus_per_node={profile.gpus_per_node}")
    if not _TIME.match(profile.slurm.time_limit):
        problems.append(f"slurm.time_limit={profile.slurm.time_limit!r} is not [D-]HH:MM:SS or minutes")
    if profile.slurm.grace_seconds < 1 or profile.slurm.max_startup_failures < 1:
        problems.append("slurm.grace_seconds and slurm.max_startup_failures must be at least 1")
    if not hasattr(signal, f"SIG{profile.slurm.signal}"):
        problems.append(f"slurm.signal={profile.slurm.signal!r} is not a signal name (USR1, USR2, TERM...)")
    problems += [f"env name {name!r} is not a shell variable name" for name in profile.env if not _ENV_NAME.match(name)]
    problems += [f"{key}: line breaks and control characters are not allowed ({value!r})"
                 for key, value in _text_values(dataclasses.asdict(profile)) if line_breaking(value)]
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return profile
