"""Distillation (objective ``distill``): a frozen teacher's features are the targets of a smaller student.

``objective.distill.teacher`` names the teacher (:mod:`pretrain.teachers`); it is frozen, outside the
optimizer and the engine, run without gradients in the training precision, and moved to every rank whole
(replicated). Two losses (:mod:`pretrain.objectives.distill_losses` holds their equations):

- ``g2sd`` (Generic-to-Specific Distillation): the student is a masked autoencoder whose decoder predicts,
  through a projector MLP, the teacher MAE's decoder tokens after its first ``teacher_decoder_blocks``
  blocks, for the class token and every patch, under the same mask; a second projector on the student's
  visible tokens predicts the teacher encoder's. The teacher is an MAE checkpoint of ours on the same grid.
- ``feature``: the student encoder sees the whole image; a linear projector (none where the widths agree)
  maps its class and patch tokens onto the teacher's, whose patch map is resized to the student's grid.
- ``dino``: DINOv2's DINO + iBOT + KoLeo step against a frozen DINOv2 teacher's heads
  (:mod:`pretrain.objectives.distill_dino`).

``mode: registers`` trains post-hoc registers into the teacher's own encoder instead
(:mod:`pretrain.objectives.distill_registers`).

Checkpoints hold the student and the projectors; the teacher is recorded by its fingerprint only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from pretrain.backbone import build_vit
from pretrain.errors import ConfigError
from pretrain.models.blocks import init_weights
from pretrain.objectives.base import (Activation, DataSpec, Objective, ObjectiveOutput, Settings, TrunkPass,
                                      embed_every_stem, register)
from pretrain.objectives.distill_dino import DinoDistillObjective
from pretrain.objectives.distill_students import StudentsObjective, check_students
from pretrain.objectives.distill_registers import UNLOCKABLE, RegistersObjective
from pretrain.objectives.distill_losses import class_and_patches, feature_losses, g2sd_losses, resize_patch_map
from pretrain.objectives.mae import DecoderShape, MAEModel, visible_count
from pretrain.objectives.masking import PerSample, gather_tokens, mae_noise, random_masking
from pretrain import teachers


@dataclass
class DistillConfig(Settings):
    """Distillation from a frozen teacher."""

    teacher: str = ""
    """The teacher: an export bundle, a `pretrain import` folder (other weights: import them first), or a
    checkpoint or run folder of ours (g2sd: an MAE checkpoint of ours)."""
    loss: str = "g2sd"
    """g2sd (MAE decoder and visible features), feature (class and patch tokens) or dino (a DINOv2 teacher's
    heads give DINO and iBOT targets; objective.dinov2.* sets the student's crops, heads and losses)."""
    mask_ratio: float = 0.75
    """g2sd: fraction of patches hidden from student and teacher alike."""
    decoder_dim: int = 256
    """g2sd: the student decoder's width."""
    decoder_depth: int = 4
    """g2sd: the student decoder's blocks."""
    decoder_heads: int = 8
    """g2sd: the student decoder's heads."""
    teacher_decoder_blocks: int = 4
    """g2sd: the teacher decoder's blocks whose output is the target (the paper: 4 of 8)."""
    decoder_weight: float = 1.0
    """g2sd: weight of the decoder-feature loss."""
    visible_weight: float = 0.0
    """g2sd: weight of the visible-feature loss (0 as in the released code; the paper's equation has 1)."""
    smooth_l1_beta: float = 2.0
    """g2sd: the smooth-L1 threshold."""
    feature_loss: str = "cosine"
    """feature: cosine distance, or mse of the plain-normed tokens."""
    cls_weight: float = 1.0
    """feature: weight of the class-token loss."""
    patch_weight: float = 1.0
    """feature: weight of the patch-token loss."""
    teacher_placement: str = "auto"
    """replicated (a whole fp32 copy on every rank), partitioned (ZeRO-3 over the ranks, in the training
    precision, gathered block by block in its passes) or auto (partitioned where a replicated copy would take
    more than a tenth of a GPU's memory)."""
    mode: str = "student"
    """student (a new student learns the teacher's features by ``loss``) or registers (post-hoc registers: the
    teacher's own encoder with more registers, model.num_registers, learns its denoised patch tokens)."""
    unlock: List[str] = field(default_factory=lambda: ["registers", "pos_embed", "patch_embed", "last_block"])
    """registers: the student's parts that train (of registers, pos_embed, patch_embed, last_block, norm)."""
    views: int = 10
    """registers: shifted and flipped views of each image the teacher's targets average over (the first the
    image itself)."""
    max_shift: int = -1
    """registers: the views' largest shift in patches per axis (-1: 15% of the patch grid's side)."""
    mse_weight: float = 1.0
    """registers: weight of the mean squared error beside the cosine distance."""
    high_norm_multiple: float = 2.0
    """registers: a patch token is high-norm above this multiple of its image's median norm (logged)."""
    students: List[Dict[str, Any]] = field(default_factory=list)
    """Several students in one job (loss g2sd or feature): each a ``name`` and the ``model.*`` fields it changes
    (``{name: vits, size: S}``), trained on its own group of ranks against one teacher pass per batch
    (:mod:`pretrain.objectives.distill_students`); empty: the one student ``model.*`` describes."""

    choices = {"loss": ("g2sd", "feature", "dino"), "feature_loss": ("cosine", "mse"),
               "mode": ("student", "registers"), "teacher_placement": ("auto", "replicated", "partitioned")}

    def validate(self, cfg) -> None:
        """A teacher named, a mask that hides and shows, losses that are weighted."""
        if not self.teacher:
            raise ConfigError("objective.distill.teacher is required: the teacher's bundle, import folder, "
                              "checkpoint or weights file")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.distill.mask_ratio={self.mask_ratio} must be in (0, 1)")
        if self.students:
            check_students(cfg)
        if self.mode == "registers":
            wrong = sorted(set(self.unlock) - set(UNLOCKABLE))
            if wrong or not self.unlock or self.views < 1:
                raise ConfigError(f"objective.distill: unlock={list(self.unlock)} (each of {list(UNLOCKABLE)}, one at "
                                  f"least) and views={self.views} (>= 1) for mode=registers")
            return
        if self.loss == "dino":
            cfg.objective.dinov2.validate(cfg)
            return
        if self.teacher_decoder_blocks < 1:
            raise ConfigError(f"objective.distill.teacher_decoder_blocks={self.teacher_decoder_blocks} must be >= 1")
        weights = (self.decoder_weight, self.visible_weight) if self.loss == "g2sd" else (self.cls_weight,
                                                                                          self.patch_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise ConfigError(f"objective.distill: the {self.loss} loss weights {weights} must be >= 0, one > 0")


def projector(width: int, out: int, hidden: Optional[int] = None) -> nn.Module:
    """Linear (``hidden`` None) or Linear-GELU-Linear from the student's ``width`` to the teacher's ``out``;
    nothing where a plain linear map would keep the widths."""
    if hidden is None:
        layers = nn.Identity() if width == out else nn.Linear(width, out)
    else:
        layers = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out))
    layers.apply(init_weights)
    return layers


class G2SDStudent(nn.Module):
    """A masked autoencoder without its pixel head, and the projectors of its decoder and visible tokens to
    the teacher's widths (MLPs as wide as their outputs)."""

    def __init__(self, mae: MAEModel, teacher_encoder_dim: int, teacher_decoder_dim: int):
        super().__init__()
        mae.decoder_norm, mae.decoder_pred, mae.decoder_preds = nn.Identity(), nn.Identity(), None
        self.mae = mae
        width = mae.decoder_embed.out_features
        self.decoder_proj = projector(width, teacher_decoder_dim, teacher_decoder_dim)
        self.encoder_proj = projector(mae.encoder.embed_dim, teacher_encoder_dim, teacher_encoder_dim)

    def forward(self, images: torch.Tensor, noise: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """-> (projected decoder tokens [B, 1 + L, Dt_dec], projected visible tokens [B, 1 + K, Dt_enc],
        mask [B, L]); class token and patches, registers left out."""
        latent, ids_restore, mask = self.mae.visible_tokens(images, noise, stem)
        hidden = self.mae.decoder_hidden(latent, ids_restore)
        prefix = self.mae.encoder.num_prefix_tokens
        return (self.decoder_proj(class_and_patches(hidden, prefix)),
                self.encoder_proj(class_and_patches(latent, prefix)), mask)


class FeatureStudent(nn.Module):
    """An encoder and the linear projector of its tokens to the teacher's width."""

    def __init__(self, encoder: nn.Module, teacher_dim: int):
        super().__init__()
        self.encoder = encoder
        self.proj = projector(encoder.embed_dim, teacher_dim)

    def forward(self, images: torch.Tensor, stem: Optional[str] = None) -> torch.Tensor:
        """-> projected class token and patches [B, 1 + N, Dt]."""
        tokens = self.encoder.forward_tokens(embed_every_stem(self.encoder, images, stem=stem))
        return self.proj(class_and_patches(tokens, self.encoder.num_prefix_tokens))


@torch.no_grad()
def g2sd_targets(teacher: MAEModel, images: torch.Tensor, noise: torch.Tensor, kept: int, blocks: int,
                 stem: Optional[str] = None) -> tuple:
    """The teacher MAE under the student's mask: (decoder tokens after ``blocks`` blocks [B, 1 + L, D_dec],
    visible tokens before the encoder's final norm [B, 1 + K, D]), class token and patches."""
    enc = teacher.encoder
    ids_keep, ids_restore, _ = random_masking(noise, kept)
    trunk = enc.trunk_tokens(gather_tokens(enc.embed_patches(images, stem=stem), ids_keep))
    hidden = teacher.decoder_hidden(enc.norm(trunk), ids_restore, blocks)
    prefix = enc.num_prefix_tokens
    return class_and_patches(hidden, prefix), class_and_patches(trunk, prefix)


@register("distill", settings=DistillConfig)
class DistillObjective(teachers.FrozenTeacherMixin, Objective):
    """A student trained on a frozen teacher's features (g2sd or feature loss). Building it returns
    :class:`DinoDistillObjective` for the dino loss (DINOv2's step with a frozen teacher) and
    :class:`RegistersObjective` for mode=registers."""

    def __new__(cls, cfg):
        if cfg.objective.distill.students:
            return StudentsObjective(cfg)
        if cfg.objective.distill.mode == "registers":
            return RegistersObjective(cfg)
        if cfg.objective.distill.loss == "dino":
            return DinoDistillObjective(cfg)
        return super().__new__(cls)

    def __init__(self, cfg):
        self.cfg, self.d = cfg, cfg.objective.distill
        self.loaded = not teachers.on_meta()
        self.autocast_dtype = torch.bfloat16 if cfg.distributed.precision == "bf16" else None
        encoder = build_vit(cfg.model)
        if self.d.loss == "g2sd":
            self.teacher = teachers.mae_teacher(self.d.teacher)
            self._check_g2sd_teacher(encoder)
            mae = MAEModel(encoder, self.d.mask_ratio, self.d.decoder_dim, self.d.decoder_depth, self.d.decoder_heads,
                           norm_pix_loss=False)
            self.student = G2SDStudent(mae, self.teacher.encoder.embed_dim, self.teacher.decoder_embed.out_features)
        else:
            self.teacher = teachers.encoder_teacher(self.d.teacher, cfg.model.img_size)
            if self.teacher.in_chans != encoder.in_chans:
                raise ConfigError(f"objective.distill.teacher={self.d.teacher}: {self.teacher.in_chans} input "
                                  f"channels, the student (model.in_chans) {encoder.in_chans}")
            self.student = FeatureStudent(encoder, self.teacher.embed_dim)
        self.fingerprint = teachers.fingerprint(self.teacher) if self.loaded else ""
        teachers.run_backends(self.teacher, cfg.model.attn_backend)

    def _check_g2sd_teacher(self, encoder) -> None:
        """The teacher's decoder reads the student's mask: same patches, same grid, same channels."""
        teacher = self.teacher.encoder
        mine = (encoder.patch_size, tuple(encoder.grid), encoder.in_chans)
        theirs = (teacher.patch_size, tuple(teacher.grid), teacher.in_chans)
        if mine != theirs:
            raise ConfigError(f"objective.distill.teacher={self.d.teacher}: g2sd needs the teacher's patch size, "
                              f"grid and channels {theirs}; the student has {mine} (set model.img_size, "
                              "model.patch_size, model.in_chans)")
        if self.d.teacher_decoder_blocks > len(self.teacher.decoder_blocks):
            raise ConfigError(f"objective.distill.teacher_decoder_blocks={self.d.teacher_decoder_blocks}: the "
                              f"teacher's decoder has {len(self.teacher.decoder_blocks)} blocks")

    def data_spec(self) -> DataSpec:
        masks = PerSample(mae_noise, patches=self.encoder().num_patches) if self.d.loss == "g2sd" else None
        return DataSpec(kind="single", img_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans,
                        masks=masks)

    def encoder(self) -> nn.Module:
        return self.student.mae.encoder if self.d.loss == "g2sd" else self.student.encoder

    def _teacher_precision(self, device: torch.device):
        return (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                else contextlib.nullcontext())

    def _noise(self, batch: dict) -> torch.Tensor:
        """g2sd: the batch's MAE noise (drawn in the workers), or drawn here from its seeds."""
        noise = batch.get("mae_noise")
        if noise is None:
            noise = mae_noise(batch["seed"], self.encoder().num_patches)["mae_noise"].to(batch["image"].device)
        return noise

    @torch.no_grad()
    def teacher_targets(self, batch: dict) -> tuple:
        """The teacher's targets for a batch, batch-first tensors: g2sd (decoder tokens, visible tokens) under
        the batch's mask, feature (class token and patches,)."""
        images, stem = batch["image"], batch.get("stem")
        with self._teacher_precision(images.device):
            if self.d.loss == "g2sd":
                noise = self._noise(batch)
                return g2sd_targets(self.teacher, images, noise, self.student.mae.kept(noise.shape[1]),
                                    self.d.teacher_decoder_blocks, stem)
            return (self.teacher(images, stem),)

    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        """The student's loss against the teacher's targets: the batch's own ``teacher_targets`` where several
        students share one teacher pass, else the teacher's on it."""
        targets = batch.get("teacher_targets")
        targets = self.teacher_targets(batch) if targets is None else targets
        if self.d.loss == "g2sd":
            return self._g2sd(model, batch, targets)
        return self._feature(model, batch, targets)

    def _g2sd(self, model: Callable, batch: dict, targets: tuple) -> ObjectiveOutput:
        noise = self._noise(batch)
        decoder, visible, mask = model(batch["image"], noise, batch.get("stem"))
        target_decoder, target_visible = targets
        parts = g2sd_losses(decoder, target_decoder, visible, target_visible, self.d.smooth_l1_beta)
        loss = self.d.decoder_weight * parts["decoder_loss"] + self.d.visible_weight * parts["visible_loss"]
        metrics = {name: value.detach() for name, value in parts.items()}
        metrics["mask_ratio"] = mask.detach().float().mean()
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def _feature(self, model: Callable, batch: dict, targets: tuple) -> ObjectiveOutput:
        tokens = model(batch["image"], batch.get("stem"))
        target, = targets
        prefix = self.teacher.num_prefix_tokens
        patches = resize_patch_map(target[:, prefix:], tuple(self.teacher.grid), tuple(self.encoder().grid))
        parts = feature_losses(tokens[:, 0], target[:, 0], tokens[:, 1:], patches, self.d.feature_loss)
        loss = self.d.cls_weight * parts["cls_loss"] + self.d.patch_weight * parts["patch_loss"]
        return ObjectiveOutput(loss=loss, metrics={name: value.detach() for name, value in parts.items()})

    def token_passes(self) -> List[TrunkPass]:
        """Student and teacher passes (the teacher's without gradients), and the loss inputs kept."""
        enc, teacher = self.encoder(), self.teacher
        prefix, patches = enc.num_prefix_tokens, enc.num_patches
        if self.d.loss == "feature":
            width = teacher.embed_dim
            return [
                TrunkPass("student encoder (all patches)", enc, prefix + patches, 1, activations=[
                    Activation("input image", 1, enc.in_chans * enc.img_size ** 2),
                    Activation("final norm and projector inputs", prefix + patches, enc.embed_dim, 2),
                    Activation("loss: student and teacher tokens", 1 + patches, width, 2, fp32=True)]),
                TrunkPass("teacher encoder (all patches)", teacher, teacher.num_prefix_tokens + teacher.num_patches,
                          1, grad=False)]
        visible = visible_count(patches, self.d.mask_ratio)
        t_dec = DecoderShape(teacher)
        t_dec.depth = self.d.teacher_decoder_blocks
        t_width, s_width = t_dec.embed_dim, self.student.mae.decoder_embed.out_features
        return [
            TrunkPass("student encoder (visible patches)", enc, prefix + visible, 1, activations=[
                Activation("input image", 1, enc.in_chans * enc.img_size ** 2),
                Activation("patch tokens before masking", patches, enc.embed_dim),
                Activation("final norm, decoder embedding and projector inputs", prefix + visible, enc.embed_dim, 3)]),
            TrunkPass("student decoder (all patches)", DecoderShape(self.student.mae), prefix + patches, 1,
                      activations=[
                          Activation("decoder projector (MLP)", 1 + patches, s_width + 2 * t_width),
                          Activation("loss: prediction and target", 1 + patches, t_width, 2, fp32=True)]),
            TrunkPass("teacher encoder (visible patches)", teacher.encoder, teacher.encoder.num_prefix_tokens + visible,
                      1, grad=False),
            TrunkPass("teacher decoder (first blocks)", t_dec, teacher.encoder.num_prefix_tokens + patches, 1,
                      grad=False),
        ]
