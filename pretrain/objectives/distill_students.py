"""Several students in one distillation job (``objective.distill.students``), sharing one teacher pass per batch.

Each student is a ``name`` and the ``model.*`` fields it changes (``{name: vits, size: S}``; a new ``size``
takes that preset's widths unless the entry sets them). The ranks are split into one contiguous group per
student (the process count a multiple of the students'); on one process every student trains in turn on the
same batch. As in DINOv3's multi-distillation, the teacher runs once on every rank's own batch (so once per
sample of the global batch); the batch and the teacher's targets are gathered over all ranks, and each rank
of a student's group trains on its share of the whole global batch: ``data.batch_size`` x (process count /
group size) samples. Each student is a distill objective of its own (loss g2sd or feature), with its own
engine over its group (:mod:`pretrain.students`), checkpoint folder, metrics prefix and export.

The teacher is replicated on every rank (ZeRO-3 partitioning it would span the students' groups: refused).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Dict, List

import torch
from omegaconf import OmegaConf
from torch import nn

from pretrain import dist, teachers
from pretrain.errors import ConfigError
from pretrain.objectives.base import DataSpec, Objective, ObjectiveOutput, build_objective

SHARED_FIELDS = ("img_size", "patch_size", "in_chans", "stems", "tubelet_size")
"""Model fields a student may not change: the batch (and, for g2sd, its mask) is the teacher's and every
student's alike."""
PRESET_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio")
"""What a student's ``size`` sets unless the entry sets it too."""
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def student_name(spec: dict) -> str:
    """A student's name: its ``name``, or vit<size> (vits, vitb)."""
    return str(spec.get("name") or f"vit{str(spec.get('size', 'tiny')).lower()}")


def check_students(cfg) -> None:
    """The students' entries against the run config (raises :class:`ConfigError` naming the entry)."""
    d = cfg.objective.distill
    if d.loss not in ("g2sd", "feature") or d.mode != "student":
        raise ConfigError(f"objective.distill.students: several students train with loss g2sd or feature and "
                          f"mode student (this run: loss {d.loss}, mode {d.mode})")
    if d.teacher_placement == "partitioned":
        raise ConfigError("objective.distill.students: the teacher is replicated (partitioning it over ranks that "
                          "belong to different students' groups is not supported); set teacher_placement: "
                          "replicated or auto")
    names = [student_name(spec) for spec in d.students]
    if len(set(names)) != len(names) or not all(NAME.match(name) for name in names):
        raise ConfigError(f"objective.distill.students: names {names} must be distinct, lower-case letters, digits, "
                          "'-' and '_'")
    for spec, name in zip(d.students, names):
        student_config(cfg, spec)  # unknown or wrongly typed fields fail here, naming the student


def student_config(cfg, spec: dict):
    """The run config of one student: its model fields applied, no students of its own, the run's name with
    the student's."""
    name = student_name(spec)
    fields = {key: value for key, value in dict(spec).items() if key != "name"}
    shared = sorted(set(fields) & set(SHARED_FIELDS))
    if shared:
        raise ConfigError(f"objective.distill.students[{name}]: {shared} are the run's (the students share its "
                          "batches); set them under model.*")
    model = OmegaConf.structured(cfg.model)
    if "size" in fields:
        for key in PRESET_FIELDS:
            fields.setdefault(key, None)
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(model, fields))
    except Exception as exc:  # omegaconf's errors name the key and the type expected
        raise ConfigError(f"objective.distill.students[{name}]: {exc}") from exc
    student = copy.deepcopy(cfg)
    student.model = merged
    student.objective.distill.students = []
    return dataclasses.replace(student, name=f"{cfg.name}-{name}")


def student_groups(count: int, world: int) -> List[List[int]]:
    """The ranks of each of ``count`` students: all of them on one process, else ``world / count``
    contiguous ranks each.

    Raises:
        ConfigError: ``world`` is not a multiple of ``count``.
    """
    if world == 1:
        return [[0] for _ in range(count)]
    if world % count:
        raise ConfigError(f"objective.distill.students: {count} students on {world} processes; the process count "
                          "must be 1 or a multiple of the students' (one group of ranks each)")
    size = world // count
    return [list(range(index * size, (index + 1) * size)) for index in range(count)]


class StudentsObjective(Objective):
    """The run's objective with several students: the teacher pass shared, each student an objective of its own
    (built by ``DistillObjective`` when ``objective.distill.students`` is set)."""

    name = "distill"

    def __init__(self, cfg):
        self.cfg = cfg
        specs = list(cfg.objective.distill.students)
        self.groups = student_groups(len(specs), dist.world_size())
        self.names = [student_name(spec) for spec in specs]
        self.configs = [student_config(cfg, spec) for spec in specs]
        mine = [index for index, ranks in enumerate(self.groups) if dist.rank() in ranks]
        with teachers.sharing():  # one teacher for this rank's students
            self.students: Dict[str, Objective] = {self.names[i]: build_objective(self.configs[i]) for i in mine}
        self.local = mine
        self.first = self.students[self.names[mine[0]]]
        self.teacher = self.first.teacher
        self.counts = {"teacher_passes": 0, "teacher_samples": 0, "student_samples": 0}

    def local_students(self) -> list:
        """(name, objective, run config, ranks of its group) of each student this rank trains."""
        return [(self.names[i], self.students[self.names[i]], self.configs[i], self.groups[i]) for i in self.local]

    def share(self, batch: dict) -> dict:
        """The batch this rank's students train on: the teacher's targets of this rank's batch, the batch and the
        targets gathered over every rank and this rank's share of them in its group (all of it on one process)."""
        targets = self.first.teacher_targets(batch)
        self.counts["teacher_passes"] += 1
        self.counts["teacher_samples"] += len(batch["image"])
        names = [name for name in ("image", "mae_noise") if torch.is_tensor(batch.get(name))]
        tensors = [batch[name] for name in names] + list(targets)
        if dist.world_size() > 1:
            ranks = self.groups[self.local[0]]
            tensors = [group_share(tensor, len(ranks), ranks.index(dist.rank())) for tensor in tensors]
        shared = dict(zip(names, tensors))
        shared.update(teacher_targets=tuple(tensors[len(names):]), stem=batch.get("stem"))
        self.counts["student_samples"] += len(shared["image"])
        return shared

    def take_counts(self) -> Dict[str, int]:
        """The teacher passes and samples, and the samples each student trained on, since the last call."""
        counts = dict(self.counts)
        self.counts = dict.fromkeys(counts, 0)
        return counts

    def data_spec(self) -> DataSpec:
        return self.first.data_spec()

    def trainable(self) -> nn.Module:
        return self.first.trainable()

    def __call__(self, model, batch: dict, step: int) -> ObjectiveOutput:
        raise TypeError("several students: the trainer runs each student's own objective on share(batch)")

    def encoder(self) -> nn.Module:
        return self.first.encoder()

    def teacher_encoder(self) -> nn.Module:
        return self.first.teacher_encoder()

    def frozen(self) -> list:
        return [self.teacher]

    def models(self) -> list:
        return [student.trainable() for student in self.students.values()] + [self.teacher]

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)

    def token_passes(self) -> list:
        return self.first.token_passes()


def group_share(tensor: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """``tensor`` (batch-first) gathered over every rank in rank order, and the ``index``-th of its ``size``
    equal parts (a rank's share of the global batch in a group of ``size`` ranks)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts).chunk(size)[index].clone()
