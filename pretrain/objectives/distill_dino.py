"""Distillation with DINO targets (``objective.distill.loss: dino``, as DINOv3 distils its ViT-7B).

The teacher is the EMA teacher of a DINOv2 run of ours (backbone, DINO head and iBOT head), frozen and kept
outside the optimizer and the engine; the student is a new encoder with new heads (``objective.dinov2.*``
gives their widths, the crops, the masks, the temperatures and the loss weights). Each step runs DINOv2's
own step (:class:`pretrain.objectives.dinov2.DINOv2Objective`) with that frozen teacher in place of the EMA
one: the teacher's heads on the unmasked global crops give the targets (Sinkhorn-Knopp or the running
centre), the student's heads on its masked global crops and its local crops are trained on them with the
DINO, iBOT and KoLeo losses. Nothing moves the teacher after a step; the running centres still move
(centering=softmax).

The student's prototypes must be the teacher's (a cross-entropy between their distributions): the head
widths inside (hidden, bottleneck, layers) are the student's own. Checkpoints hold the student and the
centres; the teacher is recorded by its fingerprint only. Export writes the student.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from torch import nn

from pretrain import teachers
from pretrain.backbone import build_vit
from pretrain.errors import ConfigError
from pretrain.objectives.dinov2 import DINOv2Objective, DINOv2Student


def prototypes(student: DINOv2Student) -> tuple:
    """(DINO prototypes, iBOT prototypes, whether iBOT has its own head) of a DINOv2 student or teacher."""
    return (student.dino_head.last_layer.weight.shape[0], student.patch_head().last_layer.weight.shape[0],
            student.ibot_head is not None)


class DinoDistillObjective(DINOv2Objective):
    """DINO + iBOT + KoLeo against a frozen DINOv2 teacher (built by ``DistillObjective`` for loss=dino)."""

    name = "distill"
    rotary_positions = False

    def __init__(self, cfg):  # noqa: super().__init__ would build an EMA copy of the student
        self.cfg, self.dino, self.d = cfg, cfg.objective.dinov2, cfg.objective.distill
        if self.dino.gram.weight:
            raise ConfigError("objective.dinov2.gram.weight: Gram anchoring holds a DINOv2 run to an earlier EMA "
                              "teacher; a distillation's teacher is frozen already (set it to 0)")
        self.gram = None
        self.loaded = not teachers.on_meta()
        self.teacher = teachers.dino_teacher(self.d.teacher)
        self.student = DINOv2Student(build_vit(cfg.model), self.dino)
        self._check_teacher()
        self.momentum = np.ones(cfg.train.steps + 1)  # a frozen teacher: the EMA's momentum is 1
        self._targets_state(cfg)
        self.fingerprint = teachers.fingerprint(self.teacher) if self.loaded else ""
        teachers.run_backends(self.teacher, cfg.model.attn_backend)

    def _check_teacher(self) -> None:
        """The teacher's patches are the student's (iBOT reads the same masked patches of the same crops), its
        prototypes too (the student's distributions are compared with its)."""
        student, teacher = self.student.encoder, self.teacher.encoder
        mine, theirs = (student.patch_size, student.in_chans), (teacher.patch_size, teacher.in_chans)
        if mine != theirs:
            raise ConfigError(f"objective.distill.teacher={self.d.teacher}: the dino loss needs the teacher's patch "
                              f"size and channels {theirs}; the student has {mine} (set model.patch_size, "
                              "model.in_chans)")
        if prototypes(self.student) != prototypes(self.teacher):
            raise ConfigError(f"objective.distill.teacher={self.d.teacher}: its heads have (DINO prototypes, iBOT "
                              f"prototypes, separate iBOT head) {prototypes(self.teacher)}, the student's "
                              f"{prototypes(self.student)}: set objective.dinov2.head_prototypes, "
                              "objective.dinov2.ibot_prototypes and objective.dinov2.ibot_separate_head to the "
                              "teacher's")

    def encoder(self) -> nn.Module:
        return self.student.encoder

    def encoders(self) -> Dict[str, nn.Module]:
        return {"student": self.student.encoder}

    def teacher_encoder(self) -> nn.Module:
        return self.teacher.encoder

    def frozen_partitioned(self, gpu_bytes: float) -> list:
        return teachers.partitioned(self.teacher, self.d.teacher_placement, gpu_bytes)

    def after_step(self, step: int) -> None:
        """The running centres only: the teacher does not move."""
        self._move_centres()

    def state_dict(self) -> dict:
        return {"teacher_fingerprint": self.fingerprint, "center": self.center.cpu(),
                "patch_center": self.patch_center.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """The centres; refuse a teacher whose weights changed (where the teacher was loaded)."""
        teachers.check_fingerprint(state.get("teacher_fingerprint", ""), self.fingerprint, self.d.teacher)
        device = self.center.device
        self.center = state["center"].to(device)
        self.patch_center = state["patch_center"].to(device)
