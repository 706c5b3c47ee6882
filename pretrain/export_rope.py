"""timm and transformers copies of a 2D encoder with DINOv3's rotary positions (``model.pos_embed=rope``).

timm: an ``Eva`` (timm.models.eva) with ``rope_type='dinov3'``, which computes DINOv3's table exactly as
ours does (patch centres in [-1, 1] per axis, periods ``base^(4k / head_dim)``, angles ``[y..., x...]``
tiled twice, rotate-half, prefix tokens unrotated), ``attn_type='rope'`` (timm's ``AttentionRope``: one
packed ``qkv`` linear with a full bias, named as ours) and no position table. The architecture is one whose
registered LayerNorm has the encoder's eps and whose blocks have LayerScale where the encoder's do (timm's Eva
takes no eps argument, config.json can hold no layer, and timm drops a None ``init_values``): with LayerScale
``vit_*_patch16_dinov3`` for 1e-5, ``vit_*_patch16_rope_224`` for 1e-6; without, ``vit_pe_core_*`` /
``eva02_*``. Every other argument that shapes the forward is stated in model_args. The only renames are
LayerScale's: ``blocks.N.ls1.gamma`` -> ``blocks.N.gamma_1``, ``ls2.gamma`` -> ``gamma_2``. Parity is within
rounding, not bitwise: timm divides the coordinates by its fp32 ``periods`` (as facebookresearch/dinov3 does),
ours and transformers multiply by ``1 / base^...``, so sin / cos differ by a few ulp (<= 5e-7) and features by
about 1e-6 on tiny encoders, 5e-6 to 1e-5 on a ViT-S/16 at 224 px (with our table in its place timm's features
are ours bit for bit).

transformers: a ``DINOv3ViTModel`` (q/k/v split out of ``qkv``, SwiGLU's ``[gate | up]`` into
``gate_proj`` / ``up_proj``, LayerScale 1.0 where the encoder has none).

The key bias. DINOv3 has none (its k bias is masked to zero), and without rotary positions a key bias
changes no attention output (it adds ``q . b_k`` to every score of a query alike). Rotary positions rotate
the bias with each patch (``q_i . R_j b_k`` differs between keys), so a trained key bias does change the
features: it is kept (transformers ``key_bias=True``; timm's packed qkv bias always holds it), and only an
all-zero one (an encoder imported from DINOv3) gives transformers' default ``key_bias=False``.
"""
from __future__ import annotations

import torch

from pretrain.models.blocks import swiglu_hidden

EVA_ARCH = {
    (1e-5, True): {"S": "vit_small_patch16_dinov3", "B": "vit_base_patch16_dinov3", "L": "vit_large_patch16_dinov3",
                   "H": "vit_huge_plus_patch16_dinov3", "g": "vit_7b_patch16_dinov3"},
    (1e-5, False): {"B": "vit_pe_core_base_patch16_224"},
    (1e-6, True): {"S": "vit_small_patch16_rope_224", "B": "vit_base_patch16_rope_224",
                   "L": "vit_large_patch16_rope_224"},
    (1e-6, False): {"tiny": "eva02_tiny_patch14_224", "S": "eva02_small_patch14_224", "B": "eva02_base_patch14_224",
                    "L": "eva02_large_patch14_224"},
}
"""timm Eva architectures by (LayerNorm eps, LayerScale on) and size. An architecture fixes what model_args cannot
(timm drops None-valued arguments, so a preset's ``init_values`` cannot be turned off, and the norm layer is no
JSON value): its norm's eps and whether blocks have LayerScale; model_args set everything else that shapes the
forward, so the size only names the preset (other sizes take the B one)."""

LAYER_SCALE_RENAMES = ((".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"))
"""Our LayerScale names -> timm Eva's."""


def is_rope(encoder) -> bool:
    """The encoder has rotary positions (and no position table)."""
    return getattr(encoder, "pos_embed_mode", None) == "rope"


def rope_settings(encoder) -> dict:
    """{'base', 'shift', 'jitter', 'rescale'} of the encoder's rotary positions (0 = augmentation off)."""
    rope = encoder.rope
    base = getattr(encoder, "rope_base", None) or rope.base
    return {"base": float(base), "shift": float(rope.shift or 0.0), "jitter": float(rope.jitter or 0.0),
            "rescale": float(rope.rescale or 0.0)}


def key_biases(encoder) -> list:
    """Each block's key bias ([D]), the middle third of ``attn.qkv.bias``."""
    dim = encoder.embed_dim
    return [block.attn.qkv.bias.detach()[dim:2 * dim] for block in encoder.blocks]


def has_key_bias(encoder) -> bool:
    """Any block's key bias is non-zero (it changes features under rotary positions: kept in the exports)."""
    return any(bool(bias.ne(0).any()) for bias in key_biases(encoder))


def timm_state_dict(encoder) -> dict:
    """The encoder's weights under timm Eva's names (LayerScale ``gamma_1`` / ``gamma_2``; no position table)."""
    out = {}
    for name, tensor in encoder.state_dict().items():
        for ours, theirs in LAYER_SCALE_RENAMES:
            if name.endswith(ours):
                name = name[: -len(ours)] + theirs
        out[name] = tensor.detach().float().contiguous()
    return out


def ours_from_timm(state: dict) -> dict:
    """:func:`timm_state_dict`'s inverse: timm Eva names -> ours (names already ours are kept)."""
    out = {}
    for name, tensor in state.items():
        for ours, theirs in LAYER_SCALE_RENAMES:
            if name.startswith("blocks.") and name.endswith(theirs):
                name = name[: -len(theirs)] + ours
        out[name] = tensor
    return out


def eva_mlp_ratio(encoder) -> float:
    """The mlp_ratio that gives timm's Eva our hidden width: ``int(dim * ratio)`` (GELU Mlp; SwiGLU: the width
    of each packed half, GluMlp's fc1 being twice that)."""
    dim = encoder.embed_dim
    hidden = swiglu_hidden(dim, encoder.mlp_ratio) if encoder.ffn == "swiglu" else int(dim * encoder.mlp_ratio)
    return float(encoder.mlp_ratio) if int(dim * encoder.mlp_ratio) == hidden else (hidden + 0.5) / dim


def timm_config(model_cfg, encoder) -> dict:
    """timm Eva architecture and the keyword arguments that rebuild this encoder.

    Raises:
        ValueError: a LayerNorm eps no registered Eva architecture has (1e-5 and 1e-6 have).
    """
    eps, layer_scale = float(encoder.norm_eps), bool(encoder.layer_scale_init)
    by_size = next((archs for (value, scaled), archs in EVA_ARCH.items()
                    if abs(eps - value) <= 1e-12 and scaled == layer_scale), None)
    if by_size is None:
        raise ValueError(f"model.norm_eps={eps:g}: timm's Eva takes its LayerNorm eps from the architecture, and its "
                         f"registered ones have {sorted({value for value, _ in EVA_ARCH})}; export needs one of those")
    rope = rope_settings(encoder)
    swiglu = encoder.ffn == "swiglu"
    args = {
        "img_size": encoder.img_size, "patch_size": encoder.patch_size, "in_chans": encoder.in_chans,
        "embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": encoder.num_heads,
        "mlp_ratio": eva_mlp_ratio(encoder), "swiglu_mlp": swiglu, "swiglu_align_to": 0, "scale_mlp": False,
        "qkv_bias": True, "qkv_fused": True, "attn_type": "rope", "qk_norm": False, "scale_attn_inner": False,
        "init_values": encoder.layer_scale_init or None,  # none: the architecture's blocks have none
        "attn_only_layer_scale": False,
        "class_token": True, "num_reg_tokens": encoder.num_registers, "no_embed_class": True,
        "use_abs_pos_emb": False, "use_rot_pos_emb": True, "rope_type": "dinov3",
        "rope_temperature": rope["base"], "rope_rotate_half": True, "rope_grid_offset": 0.0,
        "rope_grid_indexing": "ij", "rope_shift_coords": rope["shift"] or None,
        "rope_jitter_coords": rope["jitter"] or None, "rope_rescale_coords": rope["rescale"] or None,
        "use_post_norm": False, "use_pre_transformer_norm": False, "use_post_transformer_norm": True,
        "use_fc_norm": False, "dynamic_img_size": True, "global_pool": "token", "num_classes": 0,
        "use_naflex": False,
    }
    return {
        "architecture": by_size.get(getattr(model_cfg, "size", "B"), by_size["B"]),
        "model_args": {name: value for name, value in args.items() if value is not None},  # timm drops None
        "num_features": encoder.embed_dim,
        "num_prefix_tokens": encoder.num_prefix_tokens,
        "layer_norm_eps": eps,
        "features": "forward_features(x): [B, 1 + num_reg_tokens + patches, embed_dim], class token first",
    }


def hf_model(encoder):
    """An untrained transformers ``DINOv3ViTModel`` with the encoder's architecture."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    rope = rope_settings(encoder)
    swiglu = encoder.ffn == "swiglu"
    dim = encoder.embed_dim
    config = DINOv3ViTConfig(
        hidden_size=dim, num_hidden_layers=encoder.depth, num_attention_heads=encoder.num_heads,
        intermediate_size=swiglu_hidden(dim, encoder.mlp_ratio) if swiglu else int(dim * encoder.mlp_ratio),
        hidden_act="silu" if swiglu else "gelu", use_gated_mlp=swiglu, image_size=encoder.img_size,
        patch_size=encoder.patch_size, num_channels=encoder.in_chans, num_register_tokens=encoder.num_registers,
        layer_norm_eps=float(encoder.norm_eps), layerscale_value=float(encoder.layer_scale_init or 1.0),
        rope_theta=rope["base"], query_bias=True, key_bias=has_key_bias(encoder), value_bias=True, proj_bias=True,
        mlp_bias=True, pos_embed_shift=rope["shift"] or None, pos_embed_jitter=rope["jitter"] or None,
        pos_embed_rescale=rope["rescale"] or None)
    return DINOv3ViTModel(config)


def hf_state_dict(encoder, model) -> dict:
    """The encoder's weights under ``model``'s (a DINOv3ViTModel's) names; the mask token is the model's own
    (zeros: features never use it)."""
    dim = encoder.embed_dim
    key_bias = model.config.key_bias
    state = {"embeddings.cls_token": encoder.cls_token,
             "embeddings.mask_token": model.embeddings.mask_token,
             "embeddings.register_tokens": (encoder.reg_token if encoder.reg_token is not None
                                            else model.embeddings.register_tokens),
             "embeddings.patch_embeddings.weight": encoder.patch_embed.proj.weight,
             "embeddings.patch_embeddings.bias": encoder.patch_embed.proj.bias,
             "norm.weight": encoder.norm.weight, "norm.bias": encoder.norm.bias}
    for index, block in enumerate(encoder.blocks):
        prefix = f"model.layer.{index}."
        weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{prefix}attention.{name}.weight"] = weight[part * dim:(part + 1) * dim]
            if name != "k_proj" or key_bias:
                state[f"{prefix}attention.{name}.bias"] = bias[part * dim:(part + 1) * dim]
        state[f"{prefix}attention.o_proj.weight"] = block.attn.proj.weight
        state[f"{prefix}attention.o_proj.bias"] = block.attn.proj.bias
        for ours, theirs in ((block.norm1, "norm1"), (block.norm2, "norm2")):
            state[f"{prefix}{theirs}.weight"], state[f"{prefix}{theirs}.bias"] = ours.weight, ours.bias
        for ours, theirs in ((block.ls1, "layer_scale1"), (block.ls2, "layer_scale2")):
            gamma = getattr(ours, "gamma", None)
            state[f"{prefix}{theirs}.lambda1"] = gamma if gamma is not None else torch.ones(dim)
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        if encoder.ffn == "swiglu":  # packed [gate | up]
            hidden = fc2.in_features
            state.update({f"{prefix}mlp.gate_proj.weight": fc1.weight[:hidden],
                          f"{prefix}mlp.gate_proj.bias": fc1.bias[:hidden],
                          f"{prefix}mlp.up_proj.weight": fc1.weight[hidden:],
                          f"{prefix}mlp.up_proj.bias": fc1.bias[hidden:]})
        else:
            state[f"{prefix}mlp.up_proj.weight"], state[f"{prefix}mlp.up_proj.bias"] = fc1.weight, fc1.bias
        state[f"{prefix}mlp.down_proj.weight"], state[f"{prefix}mlp.down_proj.bias"] = fc2.weight, fc2.bias
    return {name: tensor.detach().float() for name, tensor in state.items()}
