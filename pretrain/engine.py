"""DeepSpeed engine construction from the run config, and the one door to the deepspeed package.

Every other module reaches DeepSpeed through the functions here (the engine and the writer of its
checkpoint files, ZeRO-3 gathers, zero_to_fp32 for export, universal checkpoints for a resume on
another process count, the ZeRO memory estimators for the planner); each imports deepspeed inside
the function, so importing this module starts nothing and prints no accelerator banner.

The optimizer is a plain ``torch.optim.AdamW`` handed to DeepSpeed (no CPU FusedAdam
build on machines without a GPU); ZeRO stage, precision, accumulation, clipping and
offload (optimizer states and ZeRO-3 parameters to CPU or NVMe) come from
:class:`pretrain.config.DistributedConfig`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import types
from typing import Dict, Iterator, List, Tuple

import torch

from pretrain import dist

log = logging.getLogger(__name__)


AIO = {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}
"""DeepSpeed's asynchronous I/O settings for NVMe offload (its documented defaults)."""


BUCKET_ELEMENTS = 50_000_000
"""ZeRO's reduce / all-gather / ZeRO-3 prefetch bucket, in elements (200 MB in fp32): a few ViT-L blocks
(12.6M parameters each), about one ViT-g block, so that overlapped communication has several buckets to
overlap with the backward pass (DeepSpeed's default of 5e8 holds a whole ViT-L in one bucket)."""


LIVE_ELEMENTS = 2 * BUCKET_ELEMENTS
"""ZeRO-3's limit on gathered parameters held at once (DeepSpeed's default, 1e9, would let a ViT-g keep
2 GB of bf16 parameters gathered beyond its working set): two buckets, a few blocks."""


def zero_settings(d) -> dict:
    """DeepSpeed's ``zero_optimization`` section for a DistributedConfig."""
    zero = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=BUCKET_ELEMENTS,
                    allgather_bucket_size=BUCKET_ELEMENTS)
    if d.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=d.zero3_persistence_threshold,
                    stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_max_live_parameters=LIVE_ELEMENTS)
    for part in ("optimizer", "param"):
        where = getattr(d, f"offload_{part}")
        if where != "none":
            zero[f"offload_{part}"] = {"device": where, "pin_memory": torch.cuda.is_available(),
                                       **({"nvme_path": d.nvme_path} if where == "nvme" else {})}
    return zero


def precision_settings(d) -> dict:
    """bf16 with fp32 master weights; with ``reduce_dtype=fp32`` gradients are reduced across ranks in fp32
    (``communication_data_type``) and accumulated over micro-batches in fp32 (``data_types.grad_accum_dtype``)
    at ZeRO 1-3. DeepSpeed's ZeRO-0 accumulates bf16 gradients in bf16 and refuses fp32 accumulation."""
    if d.precision != "bf16":
        return {"bf16": {"enabled": False}}
    out = {"bf16": {"enabled": True}}
    if d.reduce_dtype == "fp32":
        out["communication_data_type"] = "fp32"
        if d.zero_stage >= 1:
            out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def deepspeed_config(cfg, world_size: int, universal: bool = False, micro_batch: int = 0) -> dict:
    """The DeepSpeed JSON config for a RunConfig on ``world_size`` processes (an engine's data-parallel
    ranks); ``universal``: the engine will load a universal checkpoint (a ZeRO checkpoint of another process
    count, converted by :func:`to_universal`), which DeepSpeed only reads when its config says so;
    ``micro_batch``: samples per rank and micro-batch where they are not ``data.batch_size`` (a student's
    share of the global batch)."""
    d = cfg.distributed
    micro_batch = micro_batch or cfg.data.batch_size
    zero = zero_settings(d)
    extra = {"aio": AIO} if "nvme" in (d.offload_optimizer, d.offload_param) else {}
    if universal:
        extra["checkpoint"] = {"load_universal": True}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": micro_batch * d.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        **precision_settings(d),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def frozen_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config of an engine without an optimizer over a frozen module (a distillation teacher):
    ZeRO-3 partitions its parameters over the ranks and gathers them in its passes, in the run's precision."""
    fields = {"zero_stage": 3, "offload_optimizer": "none", "offload_param": "none"}
    d = (dataclasses.replace(cfg.distributed, **fields) if dataclasses.is_dataclass(cfg.distributed)
         else types.SimpleNamespace(**{**dict(cfg.distributed), **fields}))
    return {**deepspeed_config(cfg, world_size), "zero_optimization": zero_settings(d)}


def local_gpu_index(visible: int, local_rank: int) -> int:
    """The index among this process's ``visible`` GPUs that it drives.

    A task that sees one GPU (srun ``--gpus-per-task=1`` or ``--gpu-bind``: SLURM narrows
    CUDA_VISIBLE_DEVICES per task) drives ``cuda:0`` whatever its local rank; a process that sees
    the node's GPUs (torchrun, one srun task per node) drives the one at its local rank.

    Raises:
        RuntimeError: the local rank names a GPU this process cannot see.
    """
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): bind one GPU per task "
                           "(--gpus-per-task=1) or start one process per visible GPU")
    return local_rank


def device() -> torch.device:
    """The accelerator this process drives (one of its visible GPUs, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_gpu_index(torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))))
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 60) -> None:
    """Join the process group (gloo on CPU, NCCL on GPUs) with DeepSpeed's communicator.

    On GPUs the device is set first, so that NCCL and object collectives use this process's GPU.
    """
    import deepspeed
    import deepspeed.ops

    dist.ensure_env()
    # The shared-memory CPU collective is a JIT C++ build of minutes; gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    dist.init_host_group(timeout)  # host-side scalars and objects over gloo beside NCCL


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict, timeout_minutes: int = 60,
                 mpu=None):
    """deepspeed.initialize over the given module, optimizer and scheduler; ``mpu``: DeepSpeed's model-parallel
    unit, whose data-parallel group the engine reduces and partitions over (None: every rank;
    :class:`pretrain.students.GroupParallel` for a student's group).

    DeepSpeed takes its device from LOCAL_RANK unless told: it is told :func:`device`'s index.

    Returns:
        The DeepSpeedEngine (forward through it; backward/step on it).
    """
    import deepspeed

    init_distributed(timeout_minutes)
    where = types.SimpleNamespace(device_rank=device().index) if torch.cuda.is_available() else None
    engine, _, _, _ = deepspeed.initialize(args=where, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu)
    log.info("DeepSpeed engine: ZeRO-%d, %s, world %d", ds_config["zero_optimization"]["stage"],
             "bf16" if ds_config["bf16"]["enabled"] else "fp32",
             mpu.get_data_parallel_world_size() if mpu else dist.world_size())
    return engine


def route_checkpoint_files(engine, writer) -> None:
    """DeepSpeed writes ``engine``'s checkpoint files through ``writer``
    (:class:`pretrain.checkpoint_writer.CheckpointWriter`: its ``put`` writes in place or copies to host
    memory for its background thread) instead of calling torch.save itself. Reading is DeepSpeed's own.
    In the background the writer's copy replaces the CPU clone DeepSpeed makes of views into flat buffers
    (``preserves_storage_sharing``), which would be a second copy."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WriterCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            writer.put(path, state_dict)

        def preserves_storage_sharing(self) -> bool:
            return not writer.background

    engine.checkpoint_engine = WriterCheckpointEngine(engine._config)


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


def consolidated_fp32_state(checkpoint_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """The full fp32 state dict merged by DeepSpeed's zero_to_fp32 from the per-rank ZeRO optimizer shards
    of checkpoint ``checkpoint_dir/tag`` (any world size; runs on the CPU, no process group).

    zero_to_fp32 memory-maps every rank's file and reads only the fp32 partitions (never the Adam moments):
    at its peak it holds the merged weights and those partitions' mapped pages, twice the weights. Its
    ``lazy_mode`` (tensors gathered on demand) peaks the same, since the mapped pages of every rank stay
    resident until the last tensor is gathered."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def to_universal(src: str, dst: str, workers: int = 1) -> None:
    """Convert the ZeRO checkpoint folder ``src`` (any stage above 0, any process count) into a universal
    checkpoint at ``dst``: every parameter's full fp32 master and Adam moments in a file of its own, which
    an engine on any process count loads (:func:`load_universal`). DeepSpeed's ``ds_to_universal``, called
    as a function; ``inject_missing_state`` adds the ``universal_checkpoint_info`` our saves do not write.
    With ``workers`` > 1 it extracts and merges in a process pool (not inside a training process)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=workers,
                                            num_merge_workers=max(1, workers // 2), keep_temp_folder=False,
                                            strict=True, inject_missing_state=True))


def load_universal(engine, folder: str, tag: str) -> None:
    """Load the universal checkpoint ``folder/tag`` into ``engine`` (built with ``universal=True`` in
    :func:`deepspeed_config`), then undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal loader.

    Deliberate workarounds, harmless at ZeRO-1/2 (where the values are right already); drop them when
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` is fixed:

    * it gives every parameter group group 0's hyperparameters (lr, weight decay, lr_scale, wd_scale:
      layer decay and no-decay lost): this start's own groups' values are put back and the schedule
      re-applied at the loaded step;
    * it gives every sub-group's Adam state the same ``step`` tensor, which AdamW then increments once per
      sub-group and step (wrong bias corrections from the first step on): each state gets its own copy.

    Raises:
        RuntimeError: the engine was built without ``load_universal``, or DeepSpeed loaded nothing.
    """
    if not engine.load_universal_checkpoint():
        raise RuntimeError("the engine was built without checkpoint.load_universal: it cannot load " + folder)
    base = engine.optimizer.optimizer
    own = [{key: value for key, value in group.items() if key != "params"} for group in base.param_groups]
    loaded, _ = engine.load_checkpoint(folder, tag=tag)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint at {os.path.join(folder, tag)}")
    for group, hyper in zip(base.param_groups, own):
        group.update(hyper)
    engine.lr_scheduler.load_state_dict(engine.lr_scheduler.state_dict())
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def zero_model_state_estimate(trainable: int, largest_layer: int, stage: int, gpus_per_node: int, nodes: int,
                              offload_optimizer: bool, offload_param: bool = False) -> Tuple[float, float]:
    """DeepSpeed's own (host bytes per node, bytes per GPU) model-state estimate (mixed precision) for
    ``trainable`` parameters at ZeRO-2/3 (``largest_layer``: the most parameters one module holds, which
    ZeRO-3 gathers whole); NaNs at other stages, which DeepSpeed does not estimate."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, gpu = estimate_zero2_model_states_mem_needs(trainable, gpus_per_node, nodes, offload_optimizer)
        return float(host), float(gpu)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, gpus_per_node, nodes,
                                                            offload_optimizer, offload_param, True)
        return float(host), float(gpu)
    return math.nan, math.nan
