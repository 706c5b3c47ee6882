"""Post-hoc registers (``objective.distill.mode: registers``; PH-Reg, Chen et al. 2025, reference 0raiser0/PH-Reg).

The student is the teacher with more register tokens: ``model.*`` describes it (the teacher's architecture,
``model.num_registers`` the teacher's registers plus the new ones), its weights are the teacher's, the new
registers are drawn N(0, 1/D), and only the parts ``objective.distill.unlock`` names train (the reference's:
the registers, the position table, the patch embedding and the last block; the final norm stays). The
teacher is the frozen original. Its targets are its final normed patch tokens denoised over
``views`` shifted and flipped copies of each image (:mod:`pretrain.objectives.register_views`), mapped back
to the original grid and averaged where seen; the student, on the image itself, is trained on them with

    L = (1 - mean_patches cos(s, t)) + mse_weight * mean (s - t)^2

over the patch tokens (class token and registers left out). The share of high-norm patch tokens (trunk output
before the final norm, above ``high_norm_multiple`` x its image's median) is logged for both.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import teachers
from pretrain.backbone import build_vit
from pretrain.bundles import encoder_fields
from pretrain.errors import ConfigError
from pretrain.objectives.base import (Activation, DataSpec, Objective, ObjectiveOutput, TrunkPass,
                                      embed_every_stem)
from pretrain.objectives.masking import PerSample
from pretrain.objectives.register_views import high_norm_share, register_views, shift_flip_images, unshift_features

UNLOCKABLE = ("registers", "pos_embed", "patch_embed", "last_block", "norm")
"""Parts of the student that ``objective.distill.unlock`` may name."""


def unlocked(name: str, parts, depth: int) -> bool:
    """Whether encoder parameter ``name`` belongs to one of the ``parts`` (:data:`UNLOCKABLE`)."""
    prefixes = {"registers": ("reg_token",), "pos_embed": ("pos_embed",), "patch_embed": ("patch_embed.", "stems."),
                "last_block": (f"blocks.{depth - 1}.",), "norm": ("norm.",)}
    return any(name.startswith(prefix) for part in parts for prefix in prefixes[part])


class RegisterStudent(nn.Module):
    """The teacher's encoder with more registers; forward gives its normed patch tokens and their trunk norms."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """-> (normed patch tokens [B, N, D], trunk norms of the patch tokens [B, N], detached)."""
        enc = self.encoder
        trunk = enc.trunk_tokens(embed_every_stem(enc, images, stem=stem))[:, enc.num_prefix_tokens:]
        return enc.norm(trunk), trunk.detach().float().norm(dim=-1)


def registers_loss(student: torch.Tensor, target: torch.Tensor, mse_weight: float) -> dict:
    """{'cosine_loss', 'mse_loss', 'loss'}: 1 - mean cosine and the mean squared error of [B, N, D] tokens."""
    student, target = student.float(), target.float()
    cosine = 1.0 - F.cosine_similarity(student, target, dim=-1, eps=1e-8).mean()
    mse = ((student - target) ** 2).mean()
    return {"cosine_loss": cosine, "mse_loss": mse, "loss": cosine + mse_weight * mse}


class RegistersObjective(teachers.FrozenTeacherMixin, Objective):
    """Post-hoc registers trained against the frozen teacher's denoised patch tokens (built by
    ``DistillObjective`` for mode=registers)."""

    name = "distill"

    def __init__(self, cfg):
        self.cfg, self.d = cfg, cfg.objective.distill
        self.loaded = not teachers.on_meta()
        self.autocast_dtype = torch.bfloat16 if cfg.distributed.precision == "bf16" else None
        self.teacher = teachers.encoder_teacher(self.d.teacher, cfg.model.img_size)
        encoder = build_vit(cfg.model)
        self._check_student(encoder)
        if self.loaded:
            self._copy_teacher(encoder)
        for name, param in encoder.named_parameters():
            param.requires_grad_(unlocked(name, self.d.unlock, encoder.depth))
        self.student = RegisterStudent(encoder)
        side = min(encoder.grid)
        self.max_shift = self.d.max_shift if self.d.max_shift >= 0 else round(0.15 * side)
        self.fingerprint = teachers.fingerprint(self.teacher) if self.loaded else ""
        teachers.run_backends(self.teacher, cfg.model.attn_backend)

    def _check_student(self, encoder) -> None:
        """model.* must be the teacher's architecture with more registers."""
        mine, theirs = encoder_fields(encoder), encoder_fields(self.teacher)
        differ = sorted(k for k in mine if k not in ("size", "img_size", "num_registers") and mine[k] != theirs.get(k))
        if differ:
            raise ConfigError(f"objective.distill.teacher={self.d.teacher}: mode=registers trains the teacher's own "
                              "encoder with more registers; set " + ", ".join(
                                  f"model.{k}={theirs.get(k)} (not {mine[k]})" for k in differ))
        if encoder.num_registers <= self.teacher.num_registers:
            raise ConfigError(f"model.num_registers={encoder.num_registers}: mode=registers adds registers to the "
                              f"teacher's {self.teacher.num_registers}; set it higher")

    @torch.no_grad()
    def _copy_teacher(self, encoder) -> None:
        """The teacher's weights into the student; its registers first, the new ones N(0, 1/D)."""
        state = {k: v for k, v in self.teacher.state_dict().items() if k != "reg_token"}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"reg_token"}:
            raise ConfigError(f"objective.distill.teacher={self.d.teacher}: its weights do not fit model.* "
                              f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
        encoder.reg_token.normal_(0.0, encoder.embed_dim ** -0.5)
        kept = self.teacher.num_registers
        if kept:
            encoder.reg_token[:, :kept] = self.teacher.reg_token

    def data_spec(self) -> DataSpec:
        draw = PerSample(register_views, views=self.d.views, max_shift=self.max_shift)
        return DataSpec(kind="single", img_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans, masks=draw)

    def encoder(self) -> nn.Module:
        return self.student.encoder

    @torch.no_grad()
    def targets(self, images: torch.Tensor, views: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """(denoised teacher patch tokens [B, N, D], the teacher's trunk patch norms on the images [B, N])."""
        teacher = self.teacher
        precision = (torch.autocast(images.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                     else contextlib.nullcontext())
        with precision:
            trunk = teacher.trunk_tokens(teacher.embed_patches(shift_flip_images(images, views, teacher.patch_size),
                                                               stem=stem))
            patches = teacher.norm(trunk)[:, teacher.num_prefix_tokens:]
        norms = trunk[::views.shape[1], teacher.num_prefix_tokens:].float().norm(dim=-1)  # view 0: the image
        return unshift_features(patches.float(), views, tuple(teacher.grid)), norms

    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        images, stem = batch["image"], batch.get("stem")
        views = batch.get("register_views")
        if views is None:
            views = self.data_spec().masks.batch(batch["seed"])["register_views"].to(images.device)
        patches, norms = model(images, stem)
        target, teacher_norms = self.targets(images, views, stem)
        parts = registers_loss(patches, target, self.d.mse_weight)
        multiple = self.d.high_norm_multiple
        metrics = {"cosine_loss": parts["cosine_loss"].detach(), "mse_loss": parts["mse_loss"].detach(),
                   "high_norm_share": high_norm_share(norms, multiple),
                   "teacher_high_norm_share": high_norm_share(teacher_norms, multiple)}
        return ObjectiveOutput(loss=parts["loss"], metrics=metrics)

    def token_passes(self) -> List[TrunkPass]:
        """The student on the image (gradients reach its patch embedding), the teacher on every view."""
        enc, teacher = self.encoder(), self.teacher
        tokens = enc.num_prefix_tokens + enc.num_patches
        return [
            TrunkPass("student encoder (registers added)", enc, tokens, 1, activations=[
                Activation("input image", 1, enc.in_chans * enc.img_size ** 2),
                Activation("final norm input and output", enc.num_patches, enc.embed_dim, 2),
                Activation("loss: student tokens and targets", enc.num_patches, enc.embed_dim, 2, fp32=True)]),
            TrunkPass("teacher encoder (shifted and flipped views)", teacher,
                      teacher.num_prefix_tokens + teacher.num_patches, self.d.views, grad=False),
        ]

    def encoders(self) -> Dict[str, nn.Module]:
        return {"student": self.student.encoder}
