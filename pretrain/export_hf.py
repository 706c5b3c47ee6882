"""Hugging Face copy of an exported 2D encoder, and the parity check of a bundle.

A plain ViT (no registers, no LayerScale, GELU MLP) becomes a ``ViTModel``; one with
registers, LayerScale or SwiGLU becomes a ``Dinov2WithRegistersModel`` (LayerScale 1.0
where the encoder has none; SwiGLU's packed ``fc1`` split into ``gate_proj`` / ``up_proj``); one with
rotary positions (``model.pos_embed=rope``) a ``DINOv3ViTModel`` (:mod:`pretrain.export_rope`).
The model is built with transformers itself, filled from the encoder's weights and written
with ``save_pretrained``, so the folder has whatever layout the installed transformers reads:
``AutoModel.from_pretrained(bundle / "hf")`` loads it offline. The model is built on meta parameters
(:func:`meta_parameters`, which the export builds the objective with too) and takes the encoder's tensors
themselves (``assign=True``), so it adds no copy of the weights.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from pretrain import export_rope

HF_FOLDER = "hf"


@contextlib.contextmanager
def meta_parameters():
    """Build modules with their parameters on the meta device and their buffers real.

    Parameters are what a checkpoint fills: ``load_state_dict(assign=True)`` puts its tensors in their
    place, so they need no memory of their own and no random initialisation (init functions on meta
    tensors do nothing). Buffers are computed as in training, so the fixed ones no checkpoint holds
    (sin-cos position tables, the key-bias mask: non-persistent) are right. Each parameter is made on
    the CPU and moved at once, so at most one parameter's storage is held, uninitialised (``torch.empty``
    touches no pages). Not thread-safe: it swaps ``nn.Module.register_parameter`` while it lasts.
    """
    global _ON_META
    outer = _ON_META
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    _ON_META = True
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        _ON_META = outer


_ON_META = False


def building_on_meta() -> bool:
    """Whether modules are being built inside :func:`meta_parameters` (an objective then leaves out what
    export does not read, such as a distillation teacher loaded from elsewhere)."""
    return _ON_META


def materialise(module: nn.Module) -> None:
    """Give the meta parameters of ``module`` uninitialised CPU storage (buffers untouched, unlike
    ``to_empty``), for a load that copies into them."""
    for child in module.modules():
        for name, param in child._parameters.items():
            if param is not None and param.is_meta:
                child._parameters[name] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                       requires_grad=param.requires_grad)


def _hf_model(encoder):
    """An untrained transformers model with the encoder's architecture."""
    if export_rope.is_rope(encoder):
        return export_rope.hf_model(encoder)
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig, ViTModel

    common = dict(hidden_size=encoder.embed_dim, num_hidden_layers=encoder.depth,
                  num_attention_heads=encoder.num_heads, image_size=encoder.img_size,
                  patch_size=encoder.patch_size, num_channels=encoder.in_chans,
                  layer_norm_eps=float(getattr(encoder, "norm_eps", 1e-6)),
                  hidden_act="gelu", qkv_bias=True)
    if encoder.num_registers or encoder.layer_scale_init or encoder.ffn == "swiglu":
        if float(encoder.mlp_ratio) != int(encoder.mlp_ratio):
            raise ValueError(f"transformers' Dinov2 needs an integer mlp_ratio, this encoder has {encoder.mlp_ratio}")
        config = Dinov2WithRegistersConfig(mlp_ratio=int(encoder.mlp_ratio), num_register_tokens=encoder.num_registers,
                                           layerscale_value=1.0, use_swiglu_ffn=encoder.ffn == "swiglu", **common)
        return Dinov2WithRegistersModel(config)
    config = ViTConfig(intermediate_size=int(encoder.embed_dim * encoder.mlp_ratio), **common)
    return ViTModel(config, add_pooling_layer=False)


def _block_weights(block, dim: int) -> dict:
    """One transformer block's tensors under transformers' (>= 5) per-layer names, minus norms."""
    qkv_w, qkv_b = block.attn.qkv.weight, block.attn.qkv.bias
    out = {}
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"attention.{name}.weight"] = qkv_w[index * dim:(index + 1) * dim]
        out[f"attention.{name}.bias"] = qkv_b[index * dim:(index + 1) * dim]
    out.update({"attention.o_proj.weight": block.attn.proj.weight, "attention.o_proj.bias": block.attn.proj.bias})
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    if fc1.out_features == 2 * fc2.in_features:  # SwiGLU: packed [gate | up]
        hidden = fc2.in_features
        out.update({"mlp.gate_proj.weight": fc1.weight[:hidden], "mlp.gate_proj.bias": fc1.bias[:hidden],
                    "mlp.up_proj.weight": fc1.weight[hidden:], "mlp.up_proj.bias": fc1.bias[hidden:],
                    "mlp.down_proj.weight": fc2.weight, "mlp.down_proj.bias": fc2.bias})
    else:
        out.update({"mlp.fc1.weight": fc1.weight, "mlp.fc1.bias": fc1.bias,
                    "mlp.fc2.weight": fc2.weight, "mlp.fc2.bias": fc2.bias})
    return out


def hf_state_dict(encoder, model) -> dict:
    """The encoder's weights under the names of ``model`` (ViTModel, Dinov2WithRegistersModel or, for rotary
    positions, DINOv3ViTModel)."""
    if export_rope.is_rope(encoder):
        return export_rope.hf_state_dict(encoder, model)
    dim = encoder.embed_dim
    positions = torch.cat([torch.zeros(1, 1, dim), encoder.pos_embed.float()], dim=1)  # the class token has none
    state = {"embeddings.cls_token": encoder.cls_token,
             "embeddings.position_embeddings": positions,
             "embeddings.patch_embeddings.projection.weight": encoder.patch_embed.proj.weight,
             "embeddings.patch_embeddings.projection.bias": encoder.patch_embed.proj.bias,
             "layernorm.weight": encoder.norm.weight, "layernorm.bias": encoder.norm.bias}
    dinov2 = "embeddings.register_tokens" in model.state_dict()
    if dinov2:
        state["embeddings.register_tokens"] = (encoder.reg_token if encoder.reg_token is not None
                                               else model.embeddings.register_tokens)
        state["embeddings.mask_token"] = model.embeddings.mask_token
    for index, block in enumerate(encoder.blocks):
        prefix = f"encoder.layer.{index}." if dinov2 else f"layers.{index}."
        layer = {prefix + name: tensor for name, tensor in _block_weights(block, dim).items()}
        norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
        for ours, theirs in zip((block.norm1, block.norm2), norms):
            layer[f"{prefix}{theirs}.weight"], layer[f"{prefix}{theirs}.bias"] = ours.weight, ours.bias
        if dinov2:
            for ours, theirs in ((block.ls1, "layer_scale1"), (block.ls2, "layer_scale2")):
                gamma = getattr(ours, "gamma", None)
                layer[f"{prefix}{theirs}.lambda1"] = gamma if gamma is not None else torch.ones(dim)
        state.update(layer)
    return {name: tensor.detach().float() for name, tensor in state.items()}


def write_hf(encoder, bundle: str) -> str:
    """Write ``<bundle>/hf`` (config.json + safetensors) for a 2D encoder; returns the folder.

    The model's parameters are the encoder's tensors (views of them where one of ours is split in
    several of theirs, which ``save_pretrained`` writes as copies); the ones the encoder has no weights
    for (a mask token, registers of an encoder without any) are transformers' initial zeros.
    """
    with meta_parameters():
        model = _hf_model(encoder)
    state = {name: torch.zeros(tensor.shape) if tensor.is_meta else tensor
             for name, tensor in hf_state_dict(encoder, model).items()}
    model.load_state_dict(state, strict=True, assign=True)
    folder = os.path.join(bundle, HF_FOLDER)
    model.save_pretrained(folder)
    return folder


def verify(bundle: str, encoder, atol: float = 1e-4, batch: int = 2) -> dict:
    """Load the bundle through timm and transformers and compare their features with ``encoder``.

    Returns:
        {'timm': max abs difference, 'transformers': max abs difference}.

    Raises:
        AssertionError: a difference above ``atol``, naming the loader and the difference.
    """
    import timm
    from safetensors.torch import load_file
    from transformers import AutoModel

    with open(os.path.join(bundle, "config.json")) as handle:
        config = json.load(handle)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, encoder.in_chans, encoder.img_size, encoder.img_size, generator=generator)
    timm_model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    timm_model.load_state_dict(load_file(os.path.join(bundle, "model.safetensors")), strict=True)
    hf_model = AutoModel.from_pretrained(os.path.join(bundle, HF_FOLDER), local_files_only=True).eval()
    with torch.no_grad():
        reference = encoder.eval()(images)
        features = {"timm": timm_model.forward_features(images),
                    "transformers": hf_model(pixel_values=images).last_hidden_state}
    report = {name: float((value - reference).abs().max()) for name, value in features.items()}
    for name, difference in report.items():
        if not difference <= atol:
            raise AssertionError(f"{bundle}: {name} features differ from the training encoder by {difference:.3g} "
                                 f"(tolerance {atol})")
    return report
