"""Process-group helpers that are no-ops in a single process.

Rank, world size and the rendezvous address come from the environment that torchrun
or srun (with the generated sbatch script) sets. A plain ``python``/``pretrain train`` without them runs as rank 0 of 1:
:func:`ensure_env` fills the variables in so DeepSpeed does not try MPI discovery.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import List

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_env() -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT when absent.

    Inside an srun job step they come from SLURM (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_LOCALID; the address and port from the sbatch script's MASTER_ADDR/MASTER_PORT);
    a lone process is rank 0 of 1 on a free local port.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(f"srun task without {', '.join(missing)}: launch through `pretrain submit` "
                               "(its sbatch script exports the rendezvous address)")
        os.environ.update({"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
                           "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0")})
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})


def is_initialized() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True on rank 0."""
    return rank() == 0


def destroy() -> None:
    """Leave the process groups (NCCL frees its communicators; no watchdog outlives the run)."""
    global _host_group, _left
    if is_initialized():
        dist.destroy_process_group()
        _left = True
    _host_group = None


_left = False
"""True once this process has left a process group (:func:`leave` then ends it without finalisation)."""


def leave(code: int) -> int:
    """End a process that ran in a process group now, with ``code``, skipping the interpreter's finalisation;
    elsewhere return ``code``. Call it last: every file, checkpoint and tracker call is settled before.

    gloo's worker threads drop their last references to a finished collective (and to its tensors) just
    after the thread waiting on it is released. A DeepSpeed ZeRO-3 engine keeps its groups, and so those
    threads, alive to the end (the hooks on its parameters make cycles through C++ that the collector cannot
    free). A thread still dropping a tensor while the interpreter finalises needs the GIL and aborts the
    process (SIGABRT, "terminate called without an active exception"): under load in CI, after every step
    and checkpoint was done. Logs and the standard streams are flushed here first.
    """
    if not (_left or is_initialized()):
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


_host_group = None
"""A gloo group over the same ranks when the default group is NCCL: host-side values (floats, flags,
objects) are reduced there, on the CPU, without touching a GPU stream (no host-device synchronisation,
and NCCL refuses CPU tensors). None: the default group is gloo and serves for both."""


def init_host_group(timeout=None) -> None:
    """Create the gloo side group next to an NCCL default group (collective: every rank calls it)."""
    global _host_group
    if is_initialized() and dist.get_backend() == "nccl" and _host_group is None:
        _host_group = dist.new_group(backend="gloo", **({"timeout": timeout} if timeout else {}))


def host_group():
    """The group for host-side collectives (:data:`_host_group`; None = the default group)."""
    return _host_group


def collective_device() -> torch.device:
    """Where a collective's tensors must live: this process's CUDA device under NCCL, the CPU under gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (on the host group: no GPU involved); nothing to wait for alone."""
    if is_initialized():
        dist.barrier(group=host_group())


def all_reduce_max(value: float) -> float:
    """The maximum of a scalar over all processes."""
    if not is_initialized():
        return value
    tensor = torch.tensor([float(value)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=host_group())
    return float(tensor.item())


def all_reduce_sum(values: List[float]) -> List[float]:
    """Element-wise sums of a list of scalars over all processes, in one collective."""
    if not is_initialized():
        return list(values)
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=host_group())
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of a tensor over all processes (a new tensor on the input's device; the input
    itself alone). A tensor elsewhere than the backend's device crosses there and back."""
    if not is_initialized():
        return tensor
    total = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=host_group())
    return holder[0]


def all_gather_object(obj) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=host_group())
    return gathered
