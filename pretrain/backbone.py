"""Building the backbone for a run: the ViT from a model config, its kernels chosen for the device.

:mod:`pretrain.models` holds plain modules that run whatever they were built with. The choices that
depend on the config, the installed packages and the device are made here, once, and logged once
per process (:func:`pretrain.kernels.announce`):

- when the model is built (:func:`build_vit`): the LayerNorm implementation (``model.norm_impl``);
- when it is bound for the device and dtype it will run in (:func:`bind_kernels`, called by the
  trainer on every network of the objective): the attention and SwiGLU kernel of each layer. A model
  that is never bound runs PyTorch's path (sdpa), as export, probes and planning want;
- when ``model.compile`` asks for it (:func:`compile_blocks`): ``torch.compile`` of the blocks.

None of these changes a parameter or its name: checkpoints and exports do not depend on them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pretrain.kernels import announce, resolve_impl
from pretrain.models.attention import choose_kernel, resolve_backend
from pretrain.models.blocks import Attention, SwiGLU
from pretrain.models.vit import VIT_PRESETS, VisionTransformer


def build_vit(cfg, attn_backend: Optional[str] = None) -> VisionTransformer:
    """A VisionTransformer from a :class:`pretrain.config.ModelConfig` (preset + overrides), with the
    LayerNorm ``cfg.norm_impl`` resolves to; ``attn_backend`` overrides ``cfg.attn_backend``."""
    if cfg.size not in VIT_PRESETS:
        raise ValueError(f"model.size={cfg.size!r} is not one of {list(VIT_PRESETS)}")
    dim, depth, heads, ratio = VIT_PRESETS[cfg.size]
    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim or dim, depth=cfg.depth or depth, num_heads=cfg.num_heads or heads,
        mlp_ratio=cfg.mlp_ratio or ratio, num_registers=cfg.num_registers,
        layer_scale_init=cfg.layer_scale_init, drop_path=cfg.drop_path,
        attn_backend=attn_backend or cfg.attn_backend, activation_checkpointing=cfg.activation_checkpointing,
        ffn=cfg.ffn, stems=dict(cfg.stems), frames=cfg.frames, tubelet=cfg.tubelet_size,
        norm_impl=resolved_norm_impl(cfg), pos_embed_mode=cfg.pos_embed, norm_eps=cfg.norm_eps,
        rope={"base": cfg.rope_base, "shift": cfg.rope_shift, "jitter": cfg.rope_jitter, "rescale": cfg.rope_rescale},
        key_bias=cfg.key_bias,
    )


def resolved_norm_impl(cfg) -> str:
    """The resolved LayerNorm kernel of ``cfg.norm_impl`` ('apex' or 'torch'), logged once."""
    impl = resolve_impl("model.norm_impl", cfg.norm_impl)
    announce("LayerNorm", "apex FusedLayerNorm" if impl == "apex" else "torch LayerNorm")
    return impl


def bind_kernels(module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    """Choose once, for the device and dtype the model will run in, the kernel of every attention and
    SwiGLU layer in ``module`` (from the backend each was built with: xformers tried on such inputs,
    sdpa where it has no operator), so the forward decides nothing (no per-call lookups for
    torch.compile to trace). Returns {layer kind: kernel}, logged once per process."""
    chosen = {}
    for layer in module.modules():
        if isinstance(layer, Attention):
            head_dim = layer.qkv.in_features // layer.num_heads
            layer.kernel = choose_kernel(layer.backend, device, dtype, head_dim)
            chosen["attention"] = layer.kernel
        elif isinstance(layer, SwiGLU):
            layer.kernel = resolve_backend(layer.backend, device, announce=False)
            chosen["SwiGLU"] = layer.kernel
    for kind, kernel in chosen.items():
        announce(kind, f"{kernel} on {device.type} in {dtype}".replace("torch.", ""))
    return chosen


def compile_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` the transformer blocks of every VisionTransformer inside ``module``, in place
    (``nn.Module.compile``: parameter names and state dicts are unchanged); returns how many."""
    blocks = [block for vit in module.modules() if isinstance(vit, VisionTransformer) for block in vit.blocks]
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)
