"""The objective protocol: what every self-supervised objective provides to the trainer.

An objective owns its trainable module (student backbone, heads, decoder), its loss and
any state that is not trained (an EMA teacher, centres). The trainer wraps
``trainable()`` in the DeepSpeed engine and hands the wrapped module back to
``__call__``: forward passes go through the engine (ZeRO-3 gathers parameters there),
and only the trainer calls backward and step.

DeepSpeed's needs of a training forward that the model knows nothing of are met here, where the
objectives run it: :func:`embed_every_stem` and :func:`zero_touch` give every parameter a gradient
on every step, in one fixed module order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import numpy as np
import torch
from torch import nn

from pretrain.models.vit import VisionTransformer


@dataclass
class DataSpec:
    """The views the data pipeline must produce for an objective."""

    kind: str
    """single (one augmented view: batch['image'] [B, C, S, S]), multicrop (2 global + N local crops:
    batch['global_crops'] [B, 2, C, S, S] and batch['local_crops'] [B, N, C, s, s]), volume (a 3D crop:
    batch['volume'] [B, C, D, S, S]) or clip (video frames: batch['clip'] [B, C, T, S, S])."""
    img_size: int
    """Side of each (square) view in pixels; the global crops' side for multicrop."""
    in_chans: int
    """Channels of each view."""
    global_scale: Tuple[float, float] = (0.32, 1.0)
    """multicrop: area range of the global crops."""
    local_crops: int = 0
    """multicrop: local crops per sample."""
    local_size: int = 96
    """multicrop: side of the local crops."""
    local_scale: Tuple[float, float] = (0.05, 0.32)
    """multicrop: area range of the local crops."""
    gram_size: int = 0
    """multicrop: side of the Gram teacher's crops (batch['gram_crops'] [B, 2, C, S', S']: the global crops' boxes
    without photometric steps); 0: none."""
    depth: int = 16
    """volume: crop depth in voxels (at the target spacing)."""
    frames: int = 16
    """clip: frames per clip."""
    masks: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None
    """Per-sample tensors (an objective's masks) drawn in the DataLoader workers from the sample's seed,
    stacked into the batch by name (:class:`pretrain.objectives.masking.PerSample`); None: none."""


@dataclass
class ObjectiveOutput:
    """What one forward pass of an objective returns."""

    loss: torch.Tensor
    """Scalar loss to back-propagate (this process's micro-batch)."""
    metrics: Dict[str, float] = field(default_factory=dict)
    """Scalar metrics to log."""
    visuals: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached tensors the objective can turn into images (see Objective.render)."""


@dataclass
class Activation:
    """Tensors a pass keeps for backward beside its trunk's blocks, per crop: ``count`` of ``tokens`` x
    ``width`` elements (the patch embedding's input, a final norm, heads, the loss's inputs)."""

    name: str
    tokens: float
    """Rows (tokens) of each tensor; fractional for an expected count (the masked patches of a crop)."""
    width: int
    """Elements per row."""
    count: int = 1
    """Tensors of this shape."""
    fp32: bool = False
    """Kept in fp32 whatever the compute dtype: the loss's inputs and temporaries (logits cast to fp32 for
    the softmaxes, pixel targets and predictions)."""


@dataclass
class TrunkPass:
    """One pass of samples through a transformer trunk, as an objective runs it: what the memory planner
    (:mod:`pretrain.plan`) reads, with the trunk's width, depth, heads, FFN, LayerScale and activation
    checkpointing taken from ``trunk``."""

    name: str
    """What it is (encoder on visible patches, decoder, student local crops...)."""
    trunk: object
    """The transformer: a VisionTransformer, or any object with its ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_ratio`` (and optionally ``ffn``, ``layer_scale_init``, ``activation_checkpointing``)."""
    tokens: int
    """Tokens per crop, prefix tokens included."""
    crops: int
    """Crops (views) per sample in this pass."""
    grad: bool = True
    """False for teacher passes: nothing is kept for backward."""
    activations: List[Activation] = field(default_factory=list)
    """What else the pass keeps for backward, per crop."""


@dataclass
class Settings:
    """Base of an objective's settings dataclass: the ``objective.<name>`` section of the run config,
    declared with the objective (:func:`register`); an objective without settings keeps this empty one."""

    choices: ClassVar[Dict[str, tuple]] = {}
    """Allowed values of fields, by field name (checked whichever objective runs)."""

    def validate(self, cfg) -> None:
        """Checks against the rest of the run config when this objective is the one that runs; raise
        :class:`pretrain.errors.ConfigError` naming the key. Nothing by default."""


class Objective(ABC):
    """A self-supervised objective (registered by name, built from the run config)."""

    name: str = ""
    settings_type: Type[Settings] = Settings
    """Its settings dataclass, ``cfg.objective.<name>`` (set by :func:`register`)."""
    old_names: Tuple[str, ...] = ()
    """Former names a run config may still use for it (accepted with a warning, set by :func:`register`)."""
    rotary_positions: bool = False
    """Whether it trains with ``model.pos_embed=rope``: rotary positions serve whole square crops (an encoder
    that sees a subset of the patches would need their positions carried along)."""

    @abstractmethod
    def data_spec(self) -> DataSpec:
        """The views this objective trains on."""

    @abstractmethod
    def trainable(self) -> nn.Module:
        """The module DeepSpeed wraps and the optimizer sees."""

    @abstractmethod
    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        """One forward pass; ``model`` is the engine-wrapped ``trainable()``."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (EMA teachers, schedules). Nothing for MAE."""

    def reconfigure(self, cfg) -> None:
        """Take a stage's config (:mod:`pretrain.stages`: only settings that change no parameter shape), before
        the loader is rebuilt from :meth:`data_spec`."""
        self.cfg = cfg

    def state_dict(self) -> dict:
        """Untrained state that must survive a resume (teachers, centres)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    @abstractmethod
    def encoder(self) -> nn.Module:
        """The backbone that export writes by default and probes measure."""

    def encoders(self) -> Dict[str, nn.Module]:
        """Every backbone export can write, by name (``pretrain export --weights NAME``); default first."""
        return {"student": self.encoder()}

    def frozen(self) -> List[nn.Module]:
        """Untrained modules kept beside the trainable one (an EMA teacher); none by default."""
        return []

    def frozen_partitioned(self, gpu_bytes: float) -> List[nn.Module]:
        """The frozen modules to partition over the ranks (ZeRO-3, no optimizer) rather than replicate, on GPUs of
        ``gpu_bytes`` (0: no GPU); none by default (an EMA teacher is written to every step)."""
        return []

    def teacher_encoder(self) -> Optional[nn.Module]:
        """A distillation's frozen teacher encoder, probed once beside the student (``teacher_probe_*``);
        None by default (an EMA teacher is what :meth:`encoder` gives)."""
        return None

    @abstractmethod
    def token_passes(self) -> List[TrunkPass]:
        """The transformer passes one sample goes through per step, for the memory planner: trunk, tokens,
        crops, whether gradients flow, and what else is kept for backward."""

    def models(self) -> List[nn.Module]:
        """Every network the objective runs: trainable() and any teacher (kernels are bound on each)."""
        return [self.trainable()]

    def to(self, device: torch.device) -> None:
        """Move untrained state (teachers, centres) to the training device; the engine moves trainable()."""

    def render(self, batch: dict, out: ObjectiveOutput) -> Dict[str, np.ndarray]:
        """Images (uint8 [H, W] or [H, W, 3]) for the tracker; none by default."""
        return {}


def zero_touch(modules, dummy: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """0 x the sum of each module's output on ``dummy(module)``: a scalar that, added to a loss path, gives
    the modules zero gradients (DeepSpeed reduces, and ZeRO partitions, a gradient for every parameter on
    every rank, and waits for those a step leaves out)."""
    total = sum(module(dummy(module)).sum() for module in modules)
    return total * 0.0


def embed_every_stem(encoder: VisionTransformer, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     mask_token: Optional[torch.Tensor] = None, stem: Optional[str] = None) -> torch.Tensor:
    """:meth:`VisionTransformer.embed_patches` for a training forward under DeepSpeed: every stem of the
    encoder runs, in one fixed order whatever the batch's source, the chosen one on ``images`` and each
    other on one zero patch times 0.

    Two DeepSpeed concerns, not the model's: the unused stems get (zero) gradients, which the gradient
    reduction expects of every parameter; and the module order is the same every step, which ZeRO-3
    records in its first steps to prefetch parameters (a per-source order would invalidate it). Without
    extra stems, in eval mode or without gradients it is the model's own path.
    """
    if encoder.stems is None or not (encoder.training and torch.is_grad_enabled()):
        return encoder.embed_patches(images, mask, mask_token, stem)
    chosen = encoder.stem(stem)
    tokens, touched = None, []
    for each in encoder.all_stems():
        if each is chosen:
            tokens = each(images)
        else:
            touched.append(zero_touch([each], lambda e: images.new_zeros(1, *e.patch_shape())))
    return encoder.patch_tokens(tokens + sum(touched), chosen.grid(*images.shape[2:]), mask, mask_token)


OBJECTIVES: Dict[str, Type[Objective]] = {}


def register(name: str, settings: Type[Settings] = Settings,
             old_names: Tuple[str, ...] = ()) -> Callable[[Type[Objective]], Type[Objective]]:
    """Class decorator adding an objective to the registry under ``name``, with its settings dataclass
    (the run config's ``objective.<name>`` section, assembled from the registry when a config is loaded)
    and any former names that configs may still use."""

    def add(cls: Type[Objective]) -> Type[Objective]:
        cls.name, cls.settings_type, cls.old_names = name, settings, tuple(old_names)
        OBJECTIVES[name] = cls
        return cls

    return add


def build_objective(cfg) -> Objective:
    """The objective named by ``cfg.objective.name``, built from the run config."""
    if cfg.objective.name not in OBJECTIVES:
        raise ValueError(f"objective.name={cfg.objective.name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective.name](cfg)
