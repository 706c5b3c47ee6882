"""DINOv3 sources for `pretrain import`: encoders with rotary positions (``model.pos_embed=rope``).

- a transformers ``DINOv3ViTModel`` folder (config.json ``model_type: dinov3_vit``): q/k/v packed into
  ``qkv`` (DINOv3 holds its key bias at zero: zeros, and ``model.key_bias=false`` keeps them so: under rotary
  positions a key bias would change the features), ``up_proj`` / ``down_proj``
  into ``fc1`` / ``fc2`` (gated: ``[gate | up]``), the rope base, coordinate augmentations and LayerNorm
  eps from its config; compared with the model's own ``last_hidden_state``;
- a facebookresearch/dinov3 backbone ``.pth`` (``storage_tokens``, ``rope_embed.periods``,
  ``attn.qkv.bias_mask``, SwiGLU ``w1`` / ``w2`` / ``w3``): the base read from the stored periods, the
  hub models' LayerNorm eps (1e-5) and coordinate rescale (2) unless ``norm_eps`` says otherwise.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from data_pipeline.errors import BadInputError

DINOV3_DROPPED = (".bias_mask", "rope_embed.periods", "local_cls_norm.", "head.", "dino_head.", "ibot_head.")
"""Keys of a DINOv3 backbone that are not the encoder's weights (or are rebuilt: the rope periods)."""


def is_dinov3_state(state: dict) -> bool:
    """A facebookresearch/dinov3 backbone state dict."""
    return "storage_tokens" in state or "rope_embed.periods" in state


def rope_base(periods: torch.Tensor, head_dim: int, path: str) -> float:
    """The base of DINOv3's ``periods = base^(4k / head_dim)``; other parametrisations are refused."""
    n = len(periods)  # the last period has the most precise exponent (DINOv3 may store them in bf16)
    base = float(periods[-1].double()) ** (head_dim / (4 * (n - 1))) if n > 1 else 100.0
    expected = base ** (4 * torch.arange(len(periods), dtype=torch.float64) / head_dim)
    if len(periods) != head_dim // 4 or not torch.allclose(periods.double(), expected, rtol=1e-2):  # bf16 periods
        raise BadInputError(path, "rope_embed.periods are not base^(4k / head_dim) for this head width (min/max "
                                  "period parametrisation, or another --num-heads): not supported")
    return float(round(base)) if abs(round(base) - base) < 0.01 * base else base


def dinov3_to_timm(state: dict, path: str) -> dict:
    """facebookresearch/dinov3 names -> timm's (ours): storage tokens are registers, SwiGLU w1 / w2 / w3 ->
    fc1 = [w1 | w2] (gate first) / fc2."""
    if any(key.startswith("cls_norm.") for key in state):
        raise BadInputError(path, "separate class-token norms (untie_cls_and_patch_norms): not supported")
    out, glu = {}, {}
    for key, value in state.items():
        if key.endswith(".attn.qkv.bias") and key + "_mask" in state:  # the bias as the model uses it
            value = value * state[key + "_mask"].to(value.dtype)
        if key.startswith(DINOV3_DROPPED) or key.endswith(DINOV3_DROPPED):
            continue
        match = re.match(r"^(blocks\.\d+\.mlp)\.(w1|w2|w3)\.(weight|bias)$", key)
        if match:
            glu.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
            continue
        out["reg_token" if key == "storage_tokens" else key] = value
    for (prefix, kind), parts in glu.items():
        out[f"{prefix}.fc1.{kind}"] = torch.cat([parts["w1"], parts["w2"]])
        out[f"{prefix}.fc2.{kind}"] = parts["w3"]
    return out


def dinov3_heads(raw: dict, given: Optional[int]) -> Optional[int]:
    """--num-heads, else the head count the rope periods imply (head_dim = 4 x their number), else None."""
    periods = raw.get("rope_embed.periods")
    if given or periods is None:
        return given
    return raw["cls_token"].shape[-1] // (4 * len(periods))


def read_dinov3_state(path: str, raw: dict, num_heads: int, norm_eps: Optional[float], source_cls, clean,
                      extras: dict):
    """A Source from a DINOv3 backbone state dict (``num_heads``: from :func:`dinov3_heads` or the width)."""
    notes: list = []
    dim = raw["cls_token"].shape[-1]
    base = rope_base(raw["rope_embed.periods"], dim // num_heads, path) if "rope_embed.periods" in raw else 100.0
    state = clean(dinov3_to_timm(raw, path), notes)
    eps = 1e-5 if norm_eps is None else norm_eps
    told = "--norm-eps" if norm_eps is not None else "the DINOv3 hub models'"
    notes.append(f"LayerNorm eps {eps:g} ({told}; the weights do not record it), rope base {base:g}, "
                 "coordinate rescale 2 in training")
    side = 224 // state["patch_embed.proj.weight"].shape[-1]
    masked = any(key.endswith(".attn.qkv.bias_mask") for key in raw)
    return source_cls(path, "dinov3", state, 0, num_heads, layer_scale_init=1e-5, notes=notes, extras=extras,
                      rope={"base": base, "shift": 0.0, "jitter": 0.0, "rescale": 2.0}, norm_eps=eps,
                      img_size=side * state["patch_embed.proj.weight"].shape[-1], key_bias=not masked)


def hf_rope(config) -> dict:
    """Our rope settings from a transformers DINOv3ViTConfig."""
    return {"base": float(config.rope_theta), "shift": float(config.pos_embed_shift or 0.0),
            "jitter": float(config.pos_embed_jitter or 0.0), "rescale": float(config.pos_embed_rescale or 0.0)}


def hf_img_size(config) -> int:
    """The (square) image side of a transformers config."""
    size = config.image_size
    if isinstance(size, (list, tuple)):
        if size[0] != size[-1]:
            raise ValueError(f"image_size {size}: ours are square")
        size = size[0]
    return int(size)
