"""DeepSpeed engine construction from the run config.

The optimizer is a plain ``torch.optim.AdamW`` handed to DeepSpeed (no CPU FusedAdam
build on machines without a GPU); ZeRO stage, precision, accumulation, clipping and
offload (optimizer states and ZeRO-3 parameters to CPU or NVMe) come from
:class:`pretrain.config.DistributedConfig`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, List, Tuple

import torch

from pretrain import dist

log = logging.getLogger(__name__)


AIO = {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}
"""DeepSpeed's asynchronous I/O settings for NVMe offload (its documented defaults)."""


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON config for a RunConfig on ``world_size`` processes."""
    d = cfg.distributed
    zero = {"stage": d.zero_stage}
    if d.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = d.zero3_persistence_threshold
    for part in ("optimizer", "param"):
        where = getattr(d, f"offload_{part}")
        if where != "none":
            zero[f"offload_{part}"] = {"device": where, "pin_memory": torch.cuda.is_available(),
                                       **({"nvme_path": d.nvme_path} if where == "nvme" else {})}
    extra = {"aio": AIO} if "nvme" in (d.offload_optimizer, d.offload_param) else {}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": cfg.data.batch_size * d.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def device() -> torch.device:
    """The accelerator this process drives (its local GPU, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> None:
    """Join the process group (gloo on CPU, NCCL on GPUs) with DeepSpeed's communicator."""
    import deepspeed
    import deepspeed.ops

    dist.ensure_env()
    # The shared-memory CPU collective is a JIT C++ build of minutes; gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict):
    """deepspeed.initialize over the given module, optimizer and scheduler.

    Returns:
        The DeepSpeedEngine (forward through it; backward/step on it).
    """
    import deepspeed

    init_distributed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    log.info("DeepSpeed engine: ZeRO-%d, %s, world %d", ds_config["zero_optimization"]["stage"],
             "bf16" if ds_config["bf16"]["enabled"] else "fp32", dist.world_size())
    return engine


def compute_dtype(engine) -> torch.dtype:
    """The dtype inputs must have for the engine's module."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def gathered(params: List[torch.nn.Parameter]):
    """A context in which ZeRO-3-partitioned ``params`` hold their full values (read-only).

    Collective under ZeRO-3 (every rank must enter it with the same parameters); a no-op
    context for parameters that are not partitioned (ZeRO 0-2, or below DeepSpeed's
    persistence threshold).
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def parameter_chunks(module: torch.nn.Module) -> Iterator[Tuple[List[str], List[torch.nn.Parameter]]]:
    """The module's (names, parameters) grouped by top-level child, transformer blocks one by one.

    Gathering one chunk at a time bounds the memory a ZeRO-3 gather needs to one block.
    """
    chunks: dict = {}
    for name, param in module.named_parameters():
        parts = name.split(".")
        depth = parts.index("blocks") + 2 if "blocks" in parts[:-1] else 1
        names, params = chunks.setdefault(".".join(parts[:depth]), ([], []))
        names.append(name)
        params.append(param)
    yield from chunks.values()
