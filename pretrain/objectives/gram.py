"""DINOv3's Gram anchoring for the DINOv2 objective (``objective.dinov2.gram``).

Long DINOv2-style training keeps improving global features while patch features lose their
locality. Gram anchoring holds the student's patch-to-patch similarity structure to that of an
earlier, frozen model, the Gram teacher: for each global crop, the Gram matrix of the student's
row-L2-normalised final patch tokens (``G_s = X X^T``, ``P x P``) is pulled towards the Gram
teacher's (``G_t``) by the mean squared difference, ``mean((G_s - G_t)^2)`` over crops and entries,
weighted by ``weight`` from ``start_step`` on.

The Gram teacher is a backbone (no heads): a snapshot of the EMA teacher's taken when step
``start_step`` begins, retaken every ``refresh_every`` steps after it up to ``max_refreshes`` times,
or an encoder read from ``teacher`` (an export bundle, import folder or checkpoint of ours) in place
of the first snapshot. It sees the global crops' boxes cut at ``teacher_scale`` x the student's side
without photometric steps (``DataSpec.gram_size``), and its patch tokens are resized (bicubic, no
antialias) to the student's patch grid. Like the EMA teacher it is a full fp32 copy on every rank
(under ZeRO-3 too: the EMA teacher it copies is one), lives in the objective state of each
checkpoint, and so survives resume. Reference: facebookresearch/dinov3 (``GramLoss``, the Gram
teacher of ``SSLMetaArch``, ``gram_teacher_no_distortions``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.errors import ConfigError

KEY = "objective.dinov2.gram"
RESIZE = ("bicubic", "bilinear")


@dataclass
class GramConfig:
    """Gram anchoring (DINOv3) of the student's patch features to a frozen Gram teacher; off at weight 0."""

    weight: float = 0.0
    """Weight of the Gram loss from start_step on (0: no Gram anchoring, no Gram teacher)."""
    start_step: int = 0
    """Step at which the Gram teacher is first taken from the EMA teacher (or the loaded teacher starts) and the
    loss begins."""
    refresh_every: int = 0
    """Steps between retaking the Gram teacher from the EMA teacher after start_step (0: never)."""
    max_refreshes: int = 0
    """How many times the Gram teacher is retaken (after the first snapshot)."""
    teacher: str = ""
    """An export bundle, import folder or checkpoint of ours to use as the first Gram teacher ('' : a snapshot of
    the EMA teacher at start_step)."""
    teacher_scale: float = 2.0
    """Side of the Gram teacher's crops over the student's global crops' (DINOv3: 512 for 256)."""
    resize: str = "bicubic"
    """How the Gram teacher's patch features are resized to the student's patch grid."""
    remove_neg: bool = False
    """Set negative similarities to 0 in both Gram matrices before the loss."""

    def validate(self, cfg) -> None:
        """A whole number of patches in the Gram teacher's crops; a schedule that can refresh."""
        if not self.weight:
            return
        if self.resize not in RESIZE:
            raise ConfigError(f"{KEY}.resize={self.resize!r} is not one of {list(RESIZE)}")
        if self.gram_size(cfg) % cfg.model.patch_size:
            raise ConfigError(f"{KEY}.teacher_scale={self.teacher_scale:g}: the Gram teacher's crops "
                              f"({self.gram_size(cfg)} px) are not a multiple of model.patch_size={cfg.model.patch_size}")
        if self.max_refreshes and not self.refresh_every:
            raise ConfigError(f"{KEY}.max_refreshes={self.max_refreshes} needs {KEY}.refresh_every > 0")
        if min(self.start_step, self.refresh_every, self.max_refreshes) < 0 or self.teacher_scale <= 0:
            raise ConfigError(f"{KEY}: start_step, refresh_every and max_refreshes must be >= 0, teacher_scale > 0")

    def gram_size(self, cfg) -> int:
        """Side in pixels of the Gram teacher's crops."""
        return int(round(self.teacher_scale * cfg.model.img_size))


def gram_matrices(features: torch.Tensor, remove_neg: bool = False) -> torch.Tensor:
    """[G, P, D] patch features -> [G, P, P] cosine similarities (fp32), negatives set to 0 where asked."""
    unit = F.normalize(features.float(), dim=-1)
    grams = unit @ unit.transpose(-1, -2)
    return grams.clamp(min=0.0) if remove_neg else grams


def gram_loss(student: torch.Tensor, teacher: torch.Tensor, remove_neg: bool = False) -> torch.Tensor:
    """Mean squared difference of the per-crop Gram matrices of student and teacher patch features [G, P, D]."""
    return F.mse_loss(gram_matrices(student, remove_neg), gram_matrices(teacher.detach(), remove_neg))


def resize_patches(tokens: torch.Tensor, grid: tuple, to: tuple, mode: str = "bicubic") -> torch.Tensor:
    """[G, P, D] patch tokens on a ``grid`` (rows, columns) -> [G, P', D] on the grid ``to``."""
    if tuple(grid) == tuple(to):
        return tokens
    maps = tokens.transpose(1, 2).unflatten(2, tuple(grid))  # [G, D, rows, columns]
    maps = F.interpolate(maps.float(), size=tuple(to), mode=mode, align_corners=False, antialias=False)
    return maps.flatten(2).transpose(1, 2).to(tokens.dtype)


class GramAnchor:
    """The Gram teacher, its snapshot schedule and the Gram loss of one DINOv2 objective.

    Args:
        cfg: the run config (``objective.dinov2.gram`` enabled).
        ema_encoder: the EMA teacher's backbone, which snapshots copy.
        loaded: a Gram teacher read from ``gram.teacher`` (None: the first one is a snapshot).
    """

    def __init__(self, cfg, ema_encoder: nn.Module, loaded: Optional[nn.Module] = None):
        self.g, self.steps, self.ema = cfg.objective.dinov2.gram, cfg.train.steps, ema_encoder
        self.encoder = loaded if loaded is not None else copy.deepcopy(ema_encoder)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.size = self.g.gram_size(cfg)
        self.student_grid = tuple(ema_encoder.grid)
        self.taken = 1 if loaded is not None else 0
        """Gram teachers taken so far (a loaded one counts as the first)."""

    def reconfigure(self, cfg, student_grid: tuple) -> None:
        """A stage's Gram settings, and its student grid (its global crops' patches); the teacher is kept."""
        self.g = cfg.objective.dinov2.gram
        self.size = self.g.gram_size(cfg)
        self.student_grid = tuple(student_grid)

    def due(self, step: int) -> int:
        """How many Gram teachers the schedule has taken before step ``step`` runs (0-based: steps done)."""
        g = self.g
        if step < g.start_step:
            return 0
        refreshes = (step - g.start_step) // g.refresh_every if g.refresh_every else 0
        return 1 + min(refreshes, g.max_refreshes)

    def active(self, step: int) -> bool:
        return step >= self.g.start_step

    @torch.no_grad()
    def catch_up(self, step: int) -> None:
        """Take the EMA teacher's weights where the schedule wants a Gram teacher not taken yet (at most once
        per call: the EMA teacher holds only its latest weights)."""
        due = self.due(step)
        if due > self.taken:
            self.encoder.load_state_dict(self.ema.state_dict())
            self.taken = due

    @torch.no_grad()
    def targets(self, crops: torch.Tensor, student_grid: tuple, stem: Optional[str] = None) -> torch.Tensor:
        """The Gram teacher's final patch tokens of ``crops`` [G, C, S', S'] on the student's grid [G, P, D]."""
        features = self.encoder(crops, stem)[:, self.encoder.num_prefix_tokens:]
        grid = (crops.shape[-2] // self.encoder.patch_size, crops.shape[-1] // self.encoder.patch_size)
        return resize_patches(features, grid, student_grid, self.g.resize)

    def __call__(self, batch: dict, student_patches: torch.Tensor, step: int, precision) -> tuple:
        """(Gram loss of the student's global-crop patch tokens [G, P, D] (crop-major, as the student ran them),
        its weight at ``step``); the Gram teacher runs on the batch's ``gram_crops`` under ``precision``."""
        self.catch_up(step)
        if not self.active(step):
            return student_patches.new_zeros((), dtype=torch.float32), 0.0
        if "gram_crops" not in batch:
            raise ValueError(f"{KEY}: the batch has no 'gram_crops' (its views were made for another data spec)")
        crops = batch["gram_crops"].transpose(0, 1).flatten(0, 1)
        with precision:
            targets = self.targets(crops, self.student_grid, batch.get("stem"))
        return gram_loss(student_patches, targets, self.g.remove_neg), self.g.weight

    def token_pass(self):
        """The Gram teacher's pass over the 2 global crops at its side, without gradients (for the planner)."""
        from pretrain.objectives.base import TrunkPass

        tokens = self.encoder.num_prefix_tokens + (self.size // self.encoder.patch_size) ** 2
        return TrunkPass("Gram teacher global crops", self.encoder, tokens, 2, grad=False)

    def activations(self) -> list:
        """What the Gram loss keeps for backward per global crop: its Gram matrix and the difference (fp32)."""
        from pretrain.objectives.base import Activation

        patches = self.student_grid[0] * self.student_grid[1]
        return [Activation("Gram loss: Gram matrix, difference", patches, patches, 2, fp32=True)]

    def state_dict(self) -> dict:
        return {"gram_teacher": self.encoder.state_dict(), "gram_taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        """Restore the Gram teacher where the checkpoint has one (a run that enables Gram on resume takes its
        first snapshot when the schedule says)."""
        if "gram_teacher" in state:
            self.encoder.load_state_dict(state["gram_teacher"])
            self.taken = int(state["gram_taken"])


def gram_anchor(cfg, ema_encoder: nn.Module) -> Optional[GramAnchor]:
    """The run's :class:`GramAnchor` (its first Gram teacher read from ``gram.teacher`` where one is named, at
    the Gram teacher's side), or None where ``gram.weight`` is 0."""
    g = cfg.objective.dinov2.gram
    if not g.weight:
        return None
    loaded = None
    if g.teacher:
        from pretrain import teachers

        loaded = teachers.encoder_teacher(g.teacher, g.gram_size(cfg), f"{KEY}.teacher")
    return GramAnchor(cfg, ema_encoder, loaded)
