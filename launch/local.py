"""Start N training processes on this machine with torchrun (one rank per process, gloo on CPU).

The process count and extra environment can come from a workstation profile such as
``clusters/local.yaml``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError


@dataclass
class LocalProfile:
    """A single-machine profile."""

    name: str = "local"
    """Profile name."""
    nodes: int = 1
    """Always 1 for a local profile."""
    processes_per_node: int = 1
    """Training processes to start (one per GPU, or a few on a CPU)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables added for the training processes."""


def load_profile(path: str) -> LocalProfile:
    """Read and check a local profile; unknown keys and bad values name the file and key."""
    if not os.path.isfile(path):
        raise ConfigError(f"cluster profile not found: {path}")
    try:
        profile = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LocalProfile), OmegaConf.load(path)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: bad profile key {getattr(exc, 'full_key', None)!r}: {exc}") from None
    if profile.nodes != 1 or profile.processes_per_node < 1:
        raise ConfigError(f"{path}: a local profile has nodes: 1 and processes_per_node >= 1")
    return profile


def torchrun_command(nproc: int, argv: List[str]) -> List[str]:
    """The torchrun command line that runs ``pretrain <argv>`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pretrain.main", *argv]


def spawn(nproc: int, argv: List[str], env: Optional[Dict[str, str]] = None) -> int:
    """Run ``pretrain <argv>`` on ``nproc`` local processes; returns torchrun's exit code."""
    return subprocess.call(torchrun_command(nproc, argv), env=dict(os.environ, **(env or {})))
