"""The models a run trains, each a :class:`Unit` with its own DeepSpeed engine over its own group of ranks.

A run trains one model on every rank (a unit named ``''`` over the whole world, its files at the top of each
checkpoint folder, as always), or several distillation students
(:mod:`pretrain.objectives.distill_students`): one unit per student this rank trains, each over its group of
ranks (a DeepSpeed engine built with an ``mpu`` whose data-parallel group is that group: gradients are
reduced and ZeRO partitions within it), with its own checkpoint sub-folder::

    step_000050/students/<name>/   DeepSpeed's files of the student's engine (its group's ranks)
        trainer_state_rank{G}.pt  the step and the optimizer's parameter names (G: rank in the group)
        objective_state_rank{G}.pt  the group's shares of the student's objective state
        config.yaml               the student's run config (what `pretrain export --student` reads)

The run's own state (stream positions, RNGs, counters, lineage) stays at the top of the folder; one COMPLETE
marker covers both. Metrics of a student are logged under ``<name>/``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from pretrain import dist
from pretrain.backbone import compile_blocks
from pretrain.checkpoint import load_objective_state, objective_share
from pretrain.config import to_yaml
from pretrain.engine import build_engine as deepspeed_engine
from pretrain.engine import deepspeed_config
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.plan import step_flops, token_passes
from pretrain.stages import Stages

log = logging.getLogger(__name__)

FOLDER = "students"
"""Where a checkpoint folder keeps its students' sub-folders."""


class GroupParallel:
    """DeepSpeed's model-parallel unit (``mpu``) for an engine over one group of ranks: data parallel within
    the group, no model, tensor or pipeline parallelism (each rank's own one-rank group)."""

    def __init__(self, group, ranks: List[int], alone):
        self.group, self.ranks, self.alone = group, list(ranks), alone

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_rank(self) -> int:
        return self.ranks.index(dist.rank())

    def get_data_parallel_group_ranks(self) -> List[int]:
        return self.ranks

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.rank()

    def get_pipe_parallel_world_size(self) -> int:
        return 1


def parallel_units(groups: List[List[int]]) -> Optional[GroupParallel]:
    """This rank's :class:`GroupParallel` among the students' ``groups`` (None where its group is the whole
    world). Collective: every rank creates every group, in the same order."""
    world = dist.world_size()
    if world == 1 or all(len(ranks) == world for ranks in groups):
        return None
    alone = [torch.distributed.new_group([rank]) for rank in range(world)]
    made = [torch.distributed.new_group(ranks) for ranks in groups]
    mine = next(index for index, ranks in enumerate(groups) if dist.rank() in ranks)
    return GroupParallel(made[mine], groups[mine], alone[dist.rank()])


@dataclass
class Unit:
    """One model a run trains: its objective, run config and group of ranks, and (built by the trainer) its
    engine, schedule and optimizer parameter names."""

    name: str
    """'' for the run's one model; a student's name."""
    objective: object
    cfg: object
    ranks: List[int]
    mpu: Optional[GroupParallel] = None
    engine: object = None
    scheduler: object = None
    param_names: list = field(default_factory=list)

    @property
    def group_rank(self) -> int:
        return self.ranks.index(dist.rank()) if dist.world_size() > 1 else 0

    @property
    def group_size(self) -> int:
        return len(self.ranks) if dist.world_size() > 1 else 1

    def folder(self, path: str) -> str:
        """Where this unit's files are in checkpoint folder ``path``."""
        return os.path.join(path, FOLDER, self.name) if self.name else path

    def prefixed(self, metrics: dict) -> dict:
        """``metrics`` under this unit's name (as they are for the run's one model)."""
        return {f"{self.name}/{key}": value for key, value in metrics.items()} if self.name else metrics

    def save(self, path: str, step: int, writer) -> None:
        """A student's files in checkpoint folder ``path`` (its group's ranks write them through ``writer``)."""
        folder = self.folder(path)
        self.engine.save_checkpoint(os.path.dirname(folder), tag=self.name, save_latest=False)
        os.makedirs(folder, exist_ok=True)
        rank, size = self.group_rank, self.group_size
        writer.put(os.path.join(folder, f"trainer_state_rank{rank}.pt"),
                   {"step": step, "optimizer_param_names": self.param_names})
        writer.put(os.path.join(folder, f"objective_state_rank{rank}.pt"),
                   objective_share(self.objective.state_dict(), rank, size))
        if rank == 0:
            with open(os.path.join(folder, "config.yaml"), "w") as handle:
                handle.write(to_yaml(self.cfg))

    def load(self, path: str) -> None:
        """A student's engine and objective state from checkpoint folder ``path``.

        Raises:
            RuntimeError: the checkpoint has no files of this student, or its group had another size.
        """
        folder = self.folder(path)
        saved = len([name for name in os.listdir(folder) if name.startswith("trainer_state_rank")]) \
            if os.path.isdir(folder) else 0
        if saved != self.group_size:
            raise RuntimeError(f"{folder}: student {self.name!r} was saved by {saved} rank(s), its group now has "
                               f"{self.group_size}; several students resume on the process count they were saved on")
        loaded, _ = self.engine.load_checkpoint(os.path.dirname(folder), tag=self.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load student {self.name!r} from {folder}")
        self.objective.load_state_dict(load_objective_state(folder))


def units(objective, cfg) -> List[Unit]:
    """The units this rank trains: a several-students objective's students, else the run's one model."""
    local = getattr(objective, "local_students", None)
    if local is None:
        return [Unit("", objective, cfg, list(range(dist.world_size())))]
    return [Unit(name, student, student_cfg, ranks) for name, student, student_cfg, ranks in local()]


def build_engine(unit: Unit, world: int, universal: bool, several: bool) -> float:
    """A unit's optimizer, schedule and DeepSpeed engine over its group (on ``world`` processes in all), on its
    share of the global batch; ``universal``: it loads a universal checkpoint. Returns its FLOPs per step (the
    planner's, on this rank)."""
    cfg = unit.cfg
    module = unit.objective.trainable()
    if cfg.model.compile:
        log.info("torch.compile (%s): %d transformer blocks", cfg.model.compile_backend,
                 compile_blocks(module, cfg.model.compile_backend))
    depth = unit.objective.encoder().depth
    optimizer = build_optimizer(module, cfg.optim, depth, offload=cfg.distributed.offload_optimizer != "none")
    names = {param: name for name, param in module.named_parameters()}
    unit.param_names = [[names[p] for p in group["params"]] for group in optimizer.param_groups]  # before DeepSpeed
    unit.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps,
                                     Stages(cfg).optim_at if cfg.train.stages else None)
    share = cfg.data.batch_size * world // unit.group_size  # the run's one model: data.batch_size
    config = deepspeed_config(cfg, unit.group_size, universal, share)
    if several:  # DeepSpeed compares a save's tag over every rank: each student's group saves its own
        config["checkpoint"] = {**config.get("checkpoint", {}), "tag_validation": "Ignore"}
    unit.engine = deepspeed_engine(module, optimizer, unit.scheduler, config, cfg.distributed.timeout_minutes,
                                   unit.mpu)
    return flops_per_step(unit.objective, share, cfg)


def flops_per_step(objective, micro_batch: int, cfg) -> float:
    """One rank's FLOPs per optimizer step of ``objective`` at ``micro_batch`` (the planner's count)."""
    return step_flops(token_passes(objective), micro_batch) * cfg.distributed.grad_accum


def step_metrics(units: List[Unit], unit_losses: list, outs: list, counts: dict) -> dict:
    """Several students' metrics of a step: each one's loss, lr, gradient norm, objective metrics and samples
    trained on (the mean over its group, under ``<name>/``), and the teacher's passes and samples (every
    rank's). ``unit_losses``: each micro-batch's losses, one per unit; ``outs``: the last micro-batch's outputs."""
    mine = {}
    for index, unit in enumerate(units):
        norm = unit.engine.get_global_grad_norm()
        values = {"loss": torch.stack([losses[index] for losses in unit_losses]).mean(),
                  "lr": max(unit.scheduler.get_last_lr()),
                  "samples_per_step": counts["student_samples"] * unit.group_size,
                  **outs[index].metrics, **({"grad_norm": norm} if norm is not None else {})}
        mine.update(unit.prefixed({key: float(value) for key, value in values.items()}))
    metrics = gather_metrics(mine)
    passes, samples = dist.all_reduce_sum([counts["teacher_passes"], counts["teacher_samples"]])
    return {**metrics, "teacher_passes_per_step": passes, "teacher_samples_per_step": samples}


def probe(prober, units: List[Unit], device: torch.device) -> dict:
    """Every unit's probe metrics (a student's over its group, under its name)."""
    metrics = {}
    for unit in units:
        encoder = unit.objective.encoder()  # a teacher may keep fp32 weights under bf16 training
        metrics.update(unit.prefixed(prober.measure(encoder, device, next(encoder.parameters()).dtype, unit.ranks)))
    return metrics if not units[0].name else gather_metrics(metrics)


def gather_metrics(metrics: dict) -> dict:
    """Every rank's ``metrics`` (a student's, by prefixed name), each the mean over the ranks that have it:
    a student's over its group."""
    sums: dict = {}
    for each in dist.all_gather_object(metrics):
        for key, value in each.items():
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + float(value), count + 1)
    return {key: total / count for key, (total, count) in sums.items()}


def student_folder(path: str, name: str) -> str:
    """The folder of student ``name`` in checkpoint folder ``path``.

    Raises:
        ValueError: the checkpoint has no such student (naming those it has).
    """
    folder = os.path.join(path, FOLDER, name)
    if not os.path.isfile(os.path.join(folder, "config.yaml")):
        raise ValueError(f"{path}: no student {name!r}; it has {saved_students(path) or 'none'}")
    return folder


def saved_students(path: str) -> List[str]:
    """The students saved in checkpoint folder ``path`` (none for a run of one model)."""
    root = os.path.join(path, FOLDER)
    return sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))) \
        if os.path.isdir(root) else []


def summary_of(summary: dict, name: Optional[str]) -> dict:
    """A tracked run's summary as student ``name``'s (its ``<name>/`` metrics under their own names, beside the
    run's); the summary itself for no student."""
    if not name or "metrics" not in summary:
        return summary
    prefix = f"{name}/"
    metrics = {key: value for key, value in summary["metrics"].items() if "/" not in key or key.startswith(prefix)}
    metrics.update({key[len(prefix):]: value for key, value in summary["metrics"].items() if key.startswith(prefix)})
    return {**summary, "metrics": metrics}
