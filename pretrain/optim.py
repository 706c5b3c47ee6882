"""Parameter groups, AdamW and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, position embeddings and special tokens are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or any(part in name for part in NO_DECAY_NAMES)


def layer_id(name: str, depth: int) -> int:
    """Depth index for layer-wise lr decay: 0 for the stem and tokens, i+1 for encoder block i,
    ``depth + 1`` for everything after the encoder trunk (final norm, decoders, heads)."""
    parts = name.split(".")
    if "encoder" in parts:
        parts = parts[parts.index("encoder") + 1:]
        if parts[0] in ("patch_embed", "cls_token", "reg_token", "pos_embed"):
            return 0
        if parts[0] == "blocks":
            return int(parts[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float, depth: int) -> List[Dict]:
    """AdamW groups keyed by (decay or not, layer): each has ``lr_scale`` for layer-wise decay.

    Args:
        model: the trainable module (encoder under ``encoder.``).
        weight_decay: decay for weight matrices.
        layer_decay: factor per block below the top (1.0 = every layer at full lr).
        depth: encoder blocks.
    """
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if no_weight_decay(name, param) else weight_decay
        layer = layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        group = groups.setdefault((decay, layer), {
            "params": [], "names": [], "weight_decay": decay,
            "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg, depth: int) -> torch.optim.Optimizer:
    """torch AdamW over :func:`param_groups` (each group's lr = cfg.lr * lr_scale)."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, depth)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
        del group["names"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """LambdaLR applying :func:`lr_factor` to every group's own lr."""
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, min_ratio)
    )
