"""Parameter groups, AdamW and the per-step schedules of learning rate and weight decay.

Schedules are precomputed per step (DINOv2's habit): the learning rate warms up linearly
and follows a cosine to ``min_lr``; weight decay follows a cosine from ``weight_decay`` to
``weight_decay_end``; heads' prototype layers (``last_layer``) get lr 0 for the first
``freeze_last_layer_steps``.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from pretrain import kernels

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, position embeddings and special tokens are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or any(part in name for part in NO_DECAY_NAMES)


EMBEDDING_NAMES = ("patch_embed", "stems", "cls_token", "reg_token", "pos_embed")
"""What an encoder owns below its first block: patch embeddings (the main stem and the extra ones) and tokens."""


def embedding_inputs(model: nn.Module) -> set:
    """Full names of the parameters that modules outside the encoder feed into its input embedding.

    A module declares them by owner: its ``embedding_parameters`` attribute names its own parameters that
    enter the encoder before the first block (DINOv2's iBOT mask token replaces patch tokens there); a
    decoder's mask token, owned by a module that declares nothing, stays after the trunk."""
    names = set()
    for prefix, module in model.named_modules():
        for own in getattr(module, "embedding_parameters", ()):
            names.add(f"{prefix}.{own}" if prefix else own)
    return names


def encoder_part(name: str) -> list:
    """The dotted parts of ``name`` below its ``encoder.`` (empty for parameters outside the encoder)."""
    parts = name.split(".")
    return parts[parts.index("encoder") + 1:] if "encoder" in parts else []


def is_patch_embedding(name: str) -> bool:
    """A patch-embedding parameter (``patch_embed`` or an extra stem under ``stems``): it gets the
    patch-embedding lr multiplier."""
    part = encoder_part(name)
    return bool(part) and part[0] in ("patch_embed", "stems")


def layer_id(name: str, depth: int, embedding: frozenset = frozenset()) -> int:
    """Depth index for layer-wise lr decay: 0 for the embedding (stems, tokens, and the ``embedding``
    names: parameters others feed into it), i+1 for encoder block i, ``depth + 1`` for everything after
    the encoder trunk (final norm, decoders, heads)."""
    if name in embedding:
        return 0
    part = encoder_part(name)
    if part and part[0] in EMBEDDING_NAMES:
        return 0
    if part and part[0] == "blocks":
        return int(part[1]) + 1
    return depth + 1


def is_last_layer(name: str) -> bool:
    """A head's prototype layer, frozen for the first ``freeze_last_layer_steps``."""
    return "last_layer" in name.split(".")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float, depth: int,
                 patch_embed_lr_mult: float = 1.0) -> List[Dict]:
    """AdamW groups keyed by (decay or not, layer, patch embedding, last layer).

    Each group has ``lr_scale`` (layer-wise decay times the patch-embedding multiplier),
    ``wd_scale`` (1 where weight decay applies, else 0) and ``last_layer``.

    Args:
        model: the trainable module (encoder under ``encoder.``).
        weight_decay: decay for weight matrices.
        layer_decay: factor per block below the top (1.0 = every layer at full lr).
        depth: encoder blocks.
        patch_embed_lr_mult: lr multiplier of ``patch_embed`` parameters.
    """
    groups: Dict[tuple, Dict] = {}
    embedding = frozenset(embedding_inputs(model))
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not no_weight_decay(name, param)
        layer = layer_id(name, depth, embedding) if layer_decay != 1.0 else depth + 1
        stem = is_patch_embedding(name)
        last = is_last_layer(name)
        group = groups.setdefault((decays, layer, stem, last), {
            "params": [], "names": [], "weight_decay": weight_decay if decays else 0.0,
            "wd_scale": 1.0 if decays else 0.0, "last_layer": last,
            "lr_scale": layer_decay ** (depth + 1 - layer) * (patch_embed_lr_mult if stem else 1.0),
        })
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg, depth: int, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW (or LAMB) over :func:`param_groups` (each group's lr = cfg.lr * lr_scale), from apex or
    PyTorch as ``cfg.impl`` resolves (:mod:`pretrain.kernels`); PyTorch's when the optimizer is
    ``offload``-ed to the CPU."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, depth, cfg.patch_embed_lr_mult)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
        del group["names"]
    impl = kernels.optimizer_impl(cfg.impl, cfg.name, offload)
    return kernels.fused_optimizer(groups, cfg.lr, tuple(cfg.betas), cfg.name, impl)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine(start: float, end: float, total: int) -> List[float]:
    """``total + 1`` values going from ``start`` (step 0) to ``end`` (step ``total``) along a half cosine."""
    return [end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / max(1, total))) for step in range(total + 1)]


def step_lr(cfg, step: int, total_steps: int) -> float:
    """The lr once ``step`` of ``total_steps`` steps are done: linear warmup, then cosine to ``min_lr``."""
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return cfg.lr * lr_factor(step, cfg.warmup_steps, total_steps, min_ratio)


class StepSchedule:
    """Sets every group's lr and weight decay from per-step tables; DeepSpeed calls ``step()``.

    Group lr = lr[step] * lr_scale (0 for ``last_layer`` groups during the freeze); group
    weight decay = wd[step] * wd_scale. The state is the step counter (``last_epoch``, as
    torch schedulers name it), saved in DeepSpeed checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, total_steps: int, optim_at=None):
        self.optimizer = optimizer
        at = optim_at or (lambda step: cfg)  # a staged run's settings at each step (pretrain.stages)
        self.lr = [step_lr(at(step), step, total_steps) for step in range(total_steps + 1)]
        end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
        self.wd = cosine(cfg.weight_decay, end, total_steps)
        self.freeze_last_layer_steps = cfg.freeze_last_layer_steps
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        step = min(self.last_epoch, len(self.lr) - 1)
        for group in self.optimizer.param_groups:
            frozen = group.get("last_layer", False) and self.last_epoch < self.freeze_last_layer_steps
            group["lr"] = 0.0 if frozen else self.lr[step] * group.get("lr_scale", 1.0)
            group["weight_decay"] = self.wd[step] * group.get("wd_scale", 1.0)

    def step(self, **_) -> None:
        """Advance one optimizer step."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        """The current lr of each group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int, optim_at=None) -> StepSchedule:
    """The lr / weight-decay schedule of an optimizer built by :func:`build_optimizer` (``optim_at(step)``: the
    optim settings of a staged run's stage at each step; the lr table follows them, the weight decay ``cfg``)."""
    return StepSchedule(optimizer, cfg, total_steps, optim_at)
