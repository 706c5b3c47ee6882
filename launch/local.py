"""Start N training processes on this machine with torchrun (one rank per process, gloo on CPU).

The process count and extra environment can come from a workstation profile such as
``clusters/local.yaml`` (see launch/profiles.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Optional


def torchrun_command(nproc: int, argv: List[str]) -> List[str]:
    """The torchrun command line that runs ``pretrain <argv>`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pretrain.main", *argv]


def spawn(nproc: int, argv: List[str], env: Optional[Dict[str, str]] = None) -> int:
    """Run ``pretrain <argv>`` on ``nproc`` local processes; returns torchrun's exit code."""
    return subprocess.call(torchrun_command(nproc, argv), env=dict(os.environ, **(env or {})))
