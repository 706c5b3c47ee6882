"""DINOv2 self-distillation: DINO (class tokens) + iBOT (masked patches) + KoLeo, with an EMA teacher.

The student (backbone + DINO head + optional iBOT head + mask token) is what DeepSpeed
wraps and trains. The teacher is a copy of the student made before the engine exists: it
is never given to the optimizer, never receives gradients, and is updated after every
optimizer step as an exponential moving average of the student. Under ZeRO-3 the
student's parameters are partitioned; the EMA gathers them one transformer block at a time
(``pretrain.engine.gathered``), and every rank keeps a full fp32 teacher (its memory is one
fp32 copy of backbone + heads per GPU). Teacher forward passes use the training precision
through autocast.

Per step: the 2 global crops of each image go through the student in one forward pass
(with iBOT masks replacing masked patches by the mask token), the local crops in a second,
and the unmasked global crops through the teacher in a third. Teacher outputs are centred
by Sinkhorn-Knopp or by a running softmax centre (``objective.dinov2.centering``); the
cross-rank sums these need are passed into the loss functions (``dino_losses.py``).
Teacher temperature and momentum follow per-step tables.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from pretrain import dist
from pretrain.engine import gathered, parameter_chunks
from pretrain.errors import ConfigError
from pretrain.models.heads import DINOHead
from pretrain.backbone import build_vit
from pretrain.models.vit import VisionTransformer
from pretrain.objectives.base import (Activation, DataSpec, Objective, ObjectiveOutput, Settings, TrunkPass,
                                     embed_every_stem, register)
from pretrain.objectives.dino_losses import (batch_center, dino_loss, entropy, ibot_loss, koleo_loss,
                                             sinkhorn_knopp, softmax_centered)
from pretrain.objectives.dino_render import dino_images
from pretrain.objectives.gram import GramConfig, gram_anchor
from pretrain.objectives.masking import PerSample, ibot_batch_masks
from pretrain.optim import cosine


class DINOv2Student(nn.Module):
    """Backbone + DINO head (+ iBOT head) + the iBOT mask token."""

    embedding_parameters = ("mask_token",)
    """The mask token replaces patch tokens before the first block: layer-wise lr decay puts it with the
    patch embedding (layer 0), as DINOv2 does with its backbone's mask token."""

    def __init__(self, encoder: VisionTransformer, cfg):
        super().__init__()
        self.encoder = encoder
        self.pack_crops = cfg.pack_crops
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.dino_head = DINOHead(dim, cfg.head_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                                  cfg.head_layers)
        self.ibot_head = DINOHead(dim, cfg.ibot_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                                  cfg.head_layers) if cfg.ibot_separate_head else None

    def patch_head(self) -> DINOHead:
        """The head applied to masked patch tokens."""
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                masked_index: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """Student pass (``stem``: the encoder stem of these crops' modality).

        Args:
            global_crops: [G, C, S, S] (G = 2B, crop-major).
            local_crops: [L, C, s, s] (L = N_local * B, crop-major; may be empty).
            masks: [G, patches] bool iBOT masks of the global crops.
            masked_index: [M] the masked patches' positions in the flattened [G * patches] (computed on
                the host from the masks: selecting by it needs no host-device synchronisation).

        Returns:
            dino_logits [G + L, K] (global crops first), ibot_logits [M, K'] (masked patches, row-major
            over images), global_cls [G, D] (backbone class tokens, for KoLeo), global_patches [G, P, D] (the
            global crops' final patch tokens, for Gram anchoring).
        """
        enc = self.encoder
        groups = [embed_every_stem(enc, global_crops, masks, self.mask_token, stem)]
        if local_crops.shape[0]:
            groups.append(embed_every_stem(enc, local_crops, stem=stem))
        outputs = enc.forward_tokens_many(groups, self.pack_crops)  # one packed pass under xformers
        features, global_cls = outputs[0], outputs[0][:, 0]
        cls = torch.cat([out[:, 0] for out in outputs])
        global_patches = features[:, enc.num_prefix_tokens:]
        patches = masked_patches(global_patches, masked_index)
        return self.dino_head(cls), self.patch_head()(patches), global_cls, global_patches

    @torch.no_grad()
    def teach(self, global_crops: torch.Tensor, masked_index: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """Teacher pass on unmasked global crops: (dino_logits [G, K], ibot_logits [M, K'] at the patches
        ``masked_index`` names)."""
        features = self.encoder(global_crops, stem)
        patches = masked_patches(features[:, self.encoder.num_prefix_tokens:], masked_index)
        return self.dino_head(features[:, 0]), self.patch_head()(patches)


def masked_patches(tokens: torch.Tensor, masked_index: torch.Tensor) -> torch.Tensor:
    """tokens [G, P, D] at the masked positions, [M, D] row-major over crops (``tokens[masks]``), selected
    by flat index: no host-device synchronisation, the count is known on the host."""
    return tokens.flatten(0, 1).index_select(0, masked_index)


def ibot_selection(masks: torch.Tensor) -> tuple:
    """For host-side [G, P] bool masks: (flat indices [M] of the masked patches, their iBOT weights [M] =
    1 / the masked patches of their crop, M), all computed on the host."""
    flat = masks.flatten()
    index = torch.arange(flat.numel())[flat]
    counts = masks.sum(dim=1, keepdim=True).clamp(min=1)
    return index, (1.0 / counts).expand_as(masks)[masks], int(index.numel())


def teacher_temperatures(cfg, steps: int) -> np.ndarray:
    """Per-step teacher temperature: linear warm-up, then constant (from step 0 without a warm-up)."""
    if cfg.warmup_teacher_temp_steps <= 0:
        return np.full(steps + 1, cfg.teacher_temp)
    warm = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, max(1, cfg.warmup_teacher_temp_steps))
    rest = np.full(max(0, steps + 1 - len(warm)), cfg.teacher_temp)
    return np.concatenate([warm, rest])[: steps + 1]


@dataclass
class DINOv2Config(Settings):
    """DINOv2 self-distillation (DINO + iBOT + KoLeo) with an EMA teacher. Defaults are DINOv2's at full size."""

    choices = {"centering": ("sinkhorn", "softmax"), "pack_crops": ("auto", "always", "never")}

    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    """Area range of the 2 global crops (their side is model.img_size)."""
    local_crops_number: int = 8
    """Local crops per image (0 = global crops only)."""
    local_crops_size: int = 96
    """Side of each local crop in pixels (a multiple of the patch size)."""
    pack_crops: str = "auto"
    """Run the student's global and local crops as one packed pass with block-diagonal attention: auto (when
    attention runs on xformers), always (sdpa with a dense mask: slower, for checking) or never (two passes)."""
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    """Area range of the local crops."""
    head_prototypes: int = 65536
    """Prototypes (output width) of the DINO head."""
    head_hidden_dim: int = 2048
    """Hidden width of the head MLPs."""
    head_bottleneck_dim: int = 256
    """Bottleneck width before the weight-normalised prototype layer."""
    head_layers: int = 3
    """Linear layers of each head MLP (the last one ends in the bottleneck)."""
    ibot_separate_head: bool = False
    """Give iBOT its own head (else patch tokens go through the DINO head)."""
    ibot_prototypes: int = 65536
    """Prototypes of the separate iBOT head."""
    dino_loss_weight: float = 1.0
    """Weight of the DINO class-token loss."""
    ibot_loss_weight: float = 1.0
    """Weight of the iBOT masked-patch loss (0 = no masking, no iBOT)."""
    koleo_loss_weight: float = 0.1
    """Weight of the KoLeo regulariser on the student's global class tokens."""
    mask_ratio: List[float] = field(default_factory=lambda: [0.1, 0.5])
    """Range of the fraction of patches masked in a masked global crop."""
    mask_probability: float = 0.5
    """Probability that a global crop is masked at all."""
    centering: str = "sinkhorn"
    """Teacher output centering: sinkhorn (Sinkhorn-Knopp) or softmax (running centre)."""
    center_momentum: float = 0.9
    """Momentum of the running centre (centering=softmax)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp normalisation rounds."""
    student_temp: float = 0.1
    """Temperature of the student softmax."""
    teacher_temp: float = 0.07
    """Teacher temperature after its warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    warmup_teacher_temp_steps: int = 30
    """Steps of the linear teacher-temperature warm-up."""
    momentum_teacher: float = 0.992
    """EMA momentum at step 0; it follows a cosine to final_momentum_teacher."""
    final_momentum_teacher: float = 1.0
    """EMA momentum at the last step."""
    gram: GramConfig = field(default_factory=GramConfig)
    """DINOv3's Gram anchoring of the student's patch features (:mod:`pretrain.objectives.gram`)."""

    def validate(self, cfg) -> None:
        """Local crops cut into whole patches; a mask-ratio range inside [0, 1)."""
        if self.local_crops_number and self.local_crops_size % cfg.model.patch_size:
            raise ConfigError(f"objective.dinov2.local_crops_size={self.local_crops_size} is not a multiple of "
                              f"model.patch_size={cfg.model.patch_size}")
        if not 0.0 <= self.mask_ratio[0] <= self.mask_ratio[1] < 1.0:
            raise ConfigError(f"objective.dinov2.mask_ratio={list(self.mask_ratio)} must be [low, high] in [0, 1)")
        self.gram.validate(cfg)


@register("dinov2", settings=DINOv2Config)
class DINOv2Objective(Objective):
    """DINOv2 on multi-crop views; iBOT masks are drawn from each sample's seed."""

    rotary_positions = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.dino = cfg.objective.dinov2
        self.student = DINOv2Student(build_vit(cfg.model), self.dino)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        for block in self.teacher.encoder.blocks:
            block.drop_path.p = 0.0
        self.momentum = cosine(self.dino.momentum_teacher, self.dino.final_momentum_teacher, cfg.train.steps)
        self._targets_state(cfg)
        self.gram = gram_anchor(cfg, self.teacher.encoder)

    def _targets_state(self, cfg) -> None:
        """The teacher-temperature table, the centres, the precision of the teacher pass and the iBOT mask
        draw (what a frozen teacher's distillation shares)."""
        self.temperature = teacher_temperatures(self.dino, cfg.train.steps)
        prototypes = self.dino.ibot_prototypes if self.dino.ibot_separate_head else self.dino.head_prototypes
        self.center = torch.zeros(self.dino.head_prototypes)
        self.patch_center = torch.zeros(prototypes)
        self._pending: Dict[str, torch.Tensor] = {}
        self.autocast_dtype = torch.bfloat16 if cfg.distributed.precision == "bf16" else None
        self.ibot_draw = self._ibot_draw(tuple(self.student.encoder.grid))

    def _ibot_draw(self, grid: tuple) -> PerSample:
        """iBOT's masks of the 2 global crops' patches, drawn per sample in the loader, for a ``grid`` of patches."""
        return PerSample(ibot_batch_masks, crops=2, grid=grid, ratio_range=tuple(self.dino.mask_ratio),
                         probability=self.dino.mask_probability)

    @property
    def crop_grid(self) -> tuple:
        """The patch grid of the global crops (model.img_size: a stage's, :mod:`pretrain.stages`)."""
        side = self.cfg.model.img_size // self.cfg.model.patch_size
        return side, side

    def reconfigure(self, cfg) -> None:  # noqa: D102 - the base class says it
        super().reconfigure(cfg)
        self.dino = cfg.objective.dinov2
        self.ibot_draw = self._ibot_draw(self.crop_grid)
        if self.gram:
            self.gram.reconfigure(cfg, self.crop_grid)

    def data_spec(self) -> DataSpec:
        d = self.dino
        return DataSpec(kind="multicrop", img_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans,
                        global_scale=tuple(d.global_crops_scale), local_crops=d.local_crops_number,
                        local_size=d.local_crops_size, local_scale=tuple(d.local_crops_scale),
                        masks=self.ibot_draw if d.ibot_loss_weight > 0 else None,
                        gram_size=self.gram.size if self.gram else 0)

    def trainable(self) -> nn.Module:
        return self.student

    def models(self) -> list:
        return [self.student, self.teacher, *self._gram_teacher()]

    def _gram_teacher(self) -> list:
        """[the Gram teacher] where Gram anchoring runs, else []."""
        return [self.gram.encoder] if self.gram else []

    def encoder(self) -> nn.Module:
        return self.teacher.encoder

    def encoders(self) -> Dict[str, nn.Module]:
        return {"teacher": self.teacher.encoder, "student": self.student.encoder}

    def frozen(self) -> list:
        return [self.teacher, *self._gram_teacher()]

    def token_passes(self) -> List[TrunkPass]:
        """Student on 2 global crops (masked) and N local crops, heads on class and masked patch tokens;
        the teacher on the global crops without gradients."""
        d, enc = self.dino, self.student.encoder
        prefix, patch, size = enc.num_prefix_tokens, enc.patch_size, d.local_crops_size
        local_tokens = prefix + (size // patch) ** 2
        side, patches = self.cfg.model.img_size, math.prod(self.crop_grid)  # a stage's global crops
        masked = d.mask_probability * sum(d.mask_ratio) / 2 * patches if d.ibot_loss_weight > 0 else 0
        # per token, a head keeps its input, 2 x (linear, GELU) hidden outputs, the bottleneck and its norm
        head = 4 * d.head_hidden_dim + 2 * d.head_bottleneck_dim + enc.embed_dim
        ibot = d.ibot_prototypes if d.ibot_separate_head else d.head_prototypes
        dino_loss = Activation("DINO loss: logits, log-softmax, targets", 1, d.head_prototypes, 3, fp32=True)

        def crops(pixels: int, tokens: int) -> list:
            return [Activation("input crop", 1, pixels), Activation("tokens", tokens, enc.embed_dim),
                    Activation("DINO head on the class token", 1, head)]

        return [
            TrunkPass("student global crops", enc, prefix + patches, 2, activations=[
                *crops(enc.in_chans * side ** 2, prefix + patches),
                Activation("iBOT head on the masked patches", masked, head), dino_loss,
                Activation("iBOT loss: logits, log-softmax, targets", masked, ibot, 3, fp32=True),
                *(self.gram.activations() if self.gram else [])]),
            TrunkPass("student local crops", enc, local_tokens, d.local_crops_number,
                      activations=[*crops(enc.in_chans * size ** 2, local_tokens), dino_loss]),
            TrunkPass("teacher global crops", self.teacher.encoder, prefix + patches, 2, grad=False),
            *([self.gram.token_pass()] if self.gram else []),
        ]

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)
        for gram_teacher in self._gram_teacher():
            gram_teacher.to(device)
        self.center = self.center.to(device)
        self.patch_center = self.patch_center.to(device)

    def _targets(self, logits: torch.Tensor, center: torch.Tensor, name: str, temperature: float) -> torch.Tensor:
        if self.dino.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temperature, self.dino.sinkhorn_iterations, dist.all_reduce_tensor)
        self._pending[name] = batch_center(logits, dist.all_reduce_tensor)
        return softmax_centered(logits, center, temperature)

    def _ibot_masks(self, batch: dict, crops: int, device: torch.device) -> tuple:
        """(masks [crops, P] bool crop-major, the masked patches' flat indices [M], their weights [M], M) on
        ``device``; from the DataLoader workers' ``ibot_masks`` (drawn here for a batch without them), with
        the indices and weights computed on the host."""
        if self.dino.ibot_loss_weight > 0:
            drawn = batch.get("ibot_masks")  # [B, crops, P]
            if drawn is None:
                drawn = self.ibot_draw.batch(batch["seed"])["ibot_masks"]
            host = drawn.transpose(0, 1).flatten(0, 1)
        else:
            host = torch.zeros(crops, math.prod(self.crop_grid), dtype=torch.bool)
        index, weights, masked = ibot_selection(host)
        return (*(t.to(device, non_blocking=True) for t in (host, index, weights)), masked)

    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        d = self.dino
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        images, crops = global_crops.shape[0], global_crops.shape[1]
        globals_flat = global_crops.transpose(0, 1).flatten(0, 1)
        locals_flat = local_crops.transpose(0, 1).flatten(0, 1)
        device = global_crops.device
        masks, index, weights, masked = self._ibot_masks(batch, crops * images, device)
        stem = batch.get("stem")
        student_dino, student_ibot, global_cls, global_patches = model(globals_flat, locals_flat, masks, index, stem)
        precision = (torch.autocast(global_crops.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                     else contextlib.nullcontext())
        with precision:
            teacher_dino, teacher_ibot = self.teacher.teach(globals_flat, index, stem)
        temperature = float(self.temperature[min(step, len(self.temperature) - 1)])
        teacher_probs = self._targets(teacher_dino.float(), self.center, "center", temperature)
        patch_probs = self._targets(teacher_ibot.float(), self.patch_center, "patch_center", temperature)
        losses = {
            "dino_loss": dino_loss(list(student_dino.chunk(crops + d.local_crops_number)),
                                   list(teacher_probs.chunk(crops)), d.student_temp),
            "ibot_loss": ibot_loss(student_ibot, patch_probs, weights, crops * images, d.student_temp),
            "koleo_loss": sum(koleo_loss(part) for part in global_cls.chunk(crops)),
        }
        loss = (d.dino_loss_weight * losses["dino_loss"] + d.ibot_loss_weight * losses["ibot_loss"]
                + d.koleo_loss_weight * losses["koleo_loss"])
        if self.gram:
            losses["gram_loss"], gram_weight = self.gram(batch, global_patches, step, precision)
            loss = loss + gram_weight * losses["gram_loss"]
        hits = torch.zeros(teacher_probs.shape[1], device=device)  # a bincount of fixed length: no sync
        used = dist.all_reduce_tensor(hits.index_add_(0, teacher_probs.argmax(dim=1), torch.ones_like(teacher_probs[:, 0])))
        metrics = {name: value.detach() for name, value in losses.items()}  # tensors until a logging step
        metrics.update({
            "teacher_temp": temperature,
            "teacher_momentum": float(self.momentum[min(step, len(self.momentum) - 1)]),
            "teacher_entropy": entropy(teacher_probs).detach(),
            "teacher_entropy_max": math.log(teacher_probs.shape[1]),
            "prototypes_used": (used > 0).sum(),
            "masked_patches": masked / max(1, crops * images),
        })
        if self.gram:
            metrics["gram_weight"] = gram_weight
        return ObjectiveOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA of the student into the teacher with the momentum of the step just taken; centre updates."""
        momentum = float(self.momentum[min(step - 1, len(self.momentum) - 1)])
        teacher = dict(self.teacher.named_parameters())
        for names, params in parameter_chunks(self.student):
            with gathered(params):
                targets = [teacher[name] for name in names]
                sources = [param.detach().to(target.device, target.dtype) for param, target in zip(params, targets)]
                torch._foreach_mul_(targets, momentum)
                torch._foreach_add_(targets, sources, alpha=1.0 - momentum)
        self._move_centres()

    def _move_centres(self) -> None:
        """The running centres towards the means of the step just taken (centering=softmax)."""
        m = self.dino.center_momentum
        for name, mean in self._pending.items():
            setattr(self, name, getattr(self, name) * m + mean * (1 - m))
        self._pending = {}

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "center": self.center.cpu(),
                "patch_center": self.patch_center.cpu(), **(self.gram.state_dict() if self.gram else {})}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        device = self.center.device
        self.center = state["center"].to(device)
        self.patch_center = state["patch_center"].to(device)
        if self.gram:
            self.gram.load_state_dict(state)

    def render(self, batch: dict, out: ObjectiveOutput, rows: int = 4) -> Dict[str, np.ndarray]:
        """The EMA teacher's class-token attention on the first global crop of ``rows`` images, and one image's
        patch-similarity map under the EMA teacher and the Gram teacher (:mod:`dino_render`)."""
        return dino_images(self.teacher.encoder, self.gram.encoder if self.gram else None, batch, rows)
