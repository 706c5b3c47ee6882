"""Readers of published ViT weights for `pretrain import`: each turns a source into a :class:`Source`, its
encoder weights in timm's ``VisionTransformer`` names (which ours share) and what the names do not say.

- transformers folders (config.json with ``model_type`` vit / dinov2 / dinov2_with_registers): loaded with
  ``AutoModel``; per-layer q/k/v (and SwiGLU gate/up) projections packed into ``qkv`` (``fc1``);
- timm folders and ``.safetensors`` files with config.json (``architecture`` + ``model_args``: timm's
  ``save_for_hf``, our export bundles): built with ``timm.create_model`` and loaded strictly;
- ``.pth`` / ``.pt``: an MAE checkpoint (``{"model": ...}``, decoder and mask token dropped), a DINOv2
  backbone (``register_tokens``, ``mask_token``, ``ls1.gamma``, SwiGLU ``w12`` / ``w3``, chunked
  ``blocks.C.N.``), a DINOv3 backbone (:mod:`pretrain.import_dinov3`), or any timm-named state dict; a bare
  ``.safetensors`` file reads like the last. transformers DINOv3 folders: :mod:`pretrain.import_dinov3` too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

from data_pipeline.errors import BadInputError
from pretrain.import_dinov3 import dinov3_heads, hf_img_size, hf_rope, is_dinov3_state, read_dinov3_state

KNOWN_HEADS = {1280: 16, 1408: 16}
"""Head counts of published widths whose heads are not 64 wide (ViT-H: 80, ViT-g/14: 88)."""
IGNORED = ("decoder_", "head.", "mask_token", "dino_head.", "ibot_head.", "pooler.")
"""Key prefixes that are not the encoder: MAE's decoder and mask token, classifier / DINO heads, poolers."""
WRAPPERS = ("model", "teacher", "state_dict", "module")
CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
TRANSFORMERS_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit")
LAYER = r"^(?:encoder\.layer|layers|model\.layer)\.(\d+)\."
HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "reg_token"), (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."), (r"^layernorm\.", "norm."),
    (r"^embeddings\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (LAYER + r"(?:norm1|layernorm_before)\.", r"blocks.\1.norm1."),
    (LAYER + r"(?:norm2|layernorm_after)\.", r"blocks.\1.norm2."),
    (LAYER + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (LAYER + r"layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (LAYER + r"mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."), (LAYER + r"mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
)
"""transformers (>= 5) names -> timm's, but for the projections packed by :func:`hf_to_timm`."""
HF_PACKED = re.compile(LAYER + r"(?:attention\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")


@dataclass
class Source:
    """Encoder weights in timm's names, and what the names alone do not say."""

    path: str
    format: str
    state: dict
    """timm names; ``pos_embed`` [1, pos_prefix + N, D]."""
    pos_prefix: int
    """Leading rows of ``pos_embed`` that belong to prefix tokens (class, then registers)."""
    num_heads: int
    layer_scale_init: float = 1e-5
    """LayerScale's initial value in the source's recipe (only a label: the trained gammas are loaded)."""
    reference: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """The source model's features (timm ``forward_features`` / transformers ``last_hidden_state``)."""
    reference_name: str = ""
    dinov2_raw: Optional[dict] = None
    """A DINOv2 backbone's own state dict, for a timm reference loading it through timm's converter."""
    notes: List[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    """Trained tensors beside the encoder: DINOv2's iBOT ``mask_token`` [D] (for the DINOv2 student)."""
    rope: Optional[dict] = None
    """DINOv3's rotary positions (``model.rope_*`` settings: base, shift, jitter, rescale); no ``pos_embed``."""
    norm_eps: float = 1e-6
    key_bias: bool = True
    """False: the source holds its key bias at zero (DINOv3's masked bias); the run keeps it so."""
    img_size: int = 0
    """The image side, for sources without a position table to read it from (rope)."""


def default_heads(dim: int, path: str, given: Optional[int]) -> int:
    """--num-heads, else the published head count of this width, else 64-wide heads."""
    heads = given or KNOWN_HEADS.get(dim) or (dim // 64 if dim % 64 == 0 else 0)
    if heads < 1 or dim % heads:
        what = f"--num-heads {given}" if given else "64-wide heads"
        raise BadInputError(path, f"width {dim} is not divisible into {what}: the weights do not record the head "
                                  "count, give --num-heads N")
    return heads


def ibot_mask_token(state: dict) -> dict:
    """{'mask_token': [D]} when ``state`` holds DINOv2's iBOT mask token ([1, D] at the encoder's width; MAE's
    decoder mask token is [1, 1, decoder width]), else {}."""
    token, cls = state.get("mask_token"), state.get("cls_token")
    if token is None or cls is None or token.ndim != 2 or token.shape[-1] != cls.shape[-1]:
        return {}
    return {"mask_token": token.reshape(-1).float().clone()}


def clean(state: dict, notes: list) -> dict:
    """Drop what is not the encoder (:data:`IGNORED`); zero biases for a bias-free qkv; noted."""
    dropped = sorted({key.split(".")[0] for key in state if key.startswith(IGNORED)})
    if dropped:
        notes.append(f"ignored (not the encoder): {', '.join(dropped)}")
    state = {key: value for key, value in state.items() if not key.startswith(IGNORED)}
    for key in [k for k in state if k.endswith((".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc1.weight",
                                                ".mlp.fc2.weight"))]:
        bias = key[:-len("weight")] + "bias"
        if bias not in state:
            state[bias] = torch.zeros(state[key].shape[0], dtype=state[key].dtype)
            note = f"{key.split('.', 2)[2][:-len('.weight')]} without bias: zero biases"
            if note not in notes:
                notes.append(note)
    return state


def require_vit(state: dict, path: str, table: bool = True) -> None:
    """A ViT with a class token, a square 2D patch embedding, a final norm and (``table``) an absolute position
    table, in timm names."""
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise BadInputError(path, "features pooled then normalised (fc_norm: a classifier fine-tune); import the "
                                  "pretrained encoder")
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.weight", "norm.weight")
    missing = [key for key in needed if key not in state and (table or key != "pos_embed")]
    if missing:
        raise BadInputError(path, f"not a ViT with a class token and learned or fixed absolute positions in timm / "
                                  f"MAE / DINOv2 names: no {missing} (keys: {sorted(state)[:8]}...)")
    proj = state["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise BadInputError(path, f"patch_embed.proj.weight {tuple(proj.shape)} is not a square 2D patch kernel")


def grid_prefix(state: dict, path: str) -> int:
    """Prefix rows of a timm state dict's ``pos_embed``: the count that leaves a square patch grid."""
    rows = state["pos_embed"].shape[1]
    registers = state["reg_token"].shape[1] if "reg_token" in state else 0
    for prefix in (1, 0, 1 + registers):
        if rows > prefix and math.isqrt(rows - prefix) ** 2 == rows - prefix:
            return prefix
    raise BadInputError(path, f"pos_embed has {rows} rows: no square patch grid after 0, 1 or {1 + registers} "
                              "prefix rows")


def dinov2_to_timm(state: dict) -> dict:
    """facebookresearch/dinov2 names -> timm's: chunked ``blocks.C.N.`` flattened, ``register_tokens`` ->
    ``reg_token``, SwiGLU ``w12`` / ``w3`` -> ``fc1`` ([gate | up], timm's SwiGLUPacked) / ``fc2``."""
    out = {}
    for key, value in state.items():
        key = CHUNKED.sub(r"blocks.\1.", key).replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out["reg_token" if key == "register_tokens" else key] = value
    return out


def _torch_state(path: str) -> tuple:
    """(flat state dict, the wrapper key it was under or '') of a .pth / .pt file (tensors only)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # MAE's training checkpoints keep `args`
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInputError(path, f"not a PyTorch checkpoint of tensors: {str(exc).splitlines()[0]}") from None
    wrapper = ""
    while isinstance(obj, dict) and (key := next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)):
        wrapper, obj = wrapper or key, obj[key]
    state = {k: v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for prefix in ("teacher.backbone.", "backbone."):  # DINOv2 training checkpoints
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if not state:
        raise BadInputError(path, "holds no state dict of tensors (looked under " + ", ".join(WRAPPERS) + ")")
    return state, wrapper


def read_state_dict(path: str, raw: dict, num_heads: Optional[int], wrapper: str = "",
                    norm_eps: Optional[float] = None) -> Source:
    """A Source from a state dict in MAE / DINOv2 / DINOv3 / timm names; the format from its keys."""
    raw = {CHUNKED.sub(r"blocks.\1.", k): v for k, v in raw.items()}
    if is_dinov3_state(raw):
        heads = default_heads(raw["cls_token"].shape[-1], path, dinov3_heads(raw, num_heads))
        source = read_dinov3_state(path, raw, heads, norm_eps, Source, clean, ibot_mask_token(raw))
        require_vit(source.state, path, table=False)
        return source
    dinov2 = ("register_tokens" in raw or any(".mlp.w12." in k for k in raw)
              or getattr(raw.get("mask_token"), "ndim", 0) == 2)  # MAE's mask token is [1, 1, decoder width]
    mae = not dinov2 and (wrapper == "model" or any(k.startswith("decoder_") for k in raw))
    notes: list = []
    timm_named = dinov2_to_timm(raw)
    extras = ibot_mask_token(timm_named)
    state = clean(timm_named, notes)
    require_vit(state, path)
    dim = state["cls_token"].shape[-1]
    prefix = 1 if (dinov2 or mae) else grid_prefix(state, path)
    source = Source(path, "dinov2" if dinov2 else "mae" if mae else "timm state dict", state, prefix,
                    default_heads(dim, path, num_heads), notes=notes,
                    dinov2_raw={k: v for k, v in raw.items() if k == "mask_token" or not k.startswith(IGNORED)}
                    if dinov2 else None, extras=extras)
    how = "--num-heads" if num_heads else f"the default for width {dim}"
    notes.append(f"num_heads={source.num_heads} ({how}; the weights do not record it)")
    return source


def read_torch(path: str, num_heads: Optional[int], norm_eps: Optional[float] = None) -> Source:
    """An MAE checkpoint, DINOv2 / DINOv3 backbone or timm-named state dict (.pth / .pt)."""
    state, wrapper = _torch_state(path)
    return read_state_dict(path, state, num_heads, wrapper, norm_eps)


def _timm_problems(model) -> list:
    """How a timm model differs from what our encoder computes ([] when it is one of ours)."""
    from timm.layers import GluMlp, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer:  # subclasses (DeiT's distilled ViT...) add tokens of their own
        return [f"{type(model).__name__} is not timm's VisionTransformer"]
    problems = [] if model.has_class_token else ["no class token"]
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("a norm before the blocks (norm_pre)")
    if model.pos_embed is None:
        problems.append("no absolute position table")
    norms = [model.norm] + [n for b in model.blocks for n in (getattr(b, "norm1", None), getattr(b, "norm2", None))]
    if not all(isinstance(n, nn.LayerNorm) and n.eps == 1e-6 and n.bias is not None for n in norms):
        problems.append("norms other than LayerNorm(eps=1e-6) with a bias")
    for block in model.blocks:
        if type(block) is not Block:
            problems.append(f"{type(block).__name__} blocks")
            continue
        attn, mlp = block.attn, block.mlp
        if not all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
            problems.append("normalised q / k or attention output")
        gelu = type(mlp) is Mlp and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
        glu = isinstance(mlp, GluMlp) and isinstance(mlp.act, nn.SiLU) and not mlp.gate_last
        if not (gelu or glu) or not isinstance(mlp.norm, nn.Identity):
            problems.append(f"feed-forward {type(mlp).__name__} ({type(mlp.act).__name__}): ours is a GELU MLP or "
                            "SwiGLU with the gate first")
    proj = model.patch_embed.proj
    if not (isinstance(proj, nn.Conv2d) and proj.stride == proj.kernel_size and proj.bias is not None
            and isinstance(model.patch_embed.norm, nn.Identity)):
        problems.append("a patch embedding other than one strided convolution with a bias")
    return sorted(set(problems))


def read_timm(path: str, config: dict, num_heads: Optional[int]) -> Source:
    """A timm folder or .safetensors file with config.json (``architecture``, optional ``model_args``)."""
    import timm
    from safetensors.torch import load_file

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidates = [path] if path.endswith(".safetensors") else [os.path.join(folder, n) for n in
                                                                ("model.safetensors", "pytorch_model.bin")]
    weights = next((c for c in candidates if os.path.isfile(c)), None)
    if weights is None:
        raise BadInputError(folder, "a timm folder without model.safetensors or pytorch_model.bin")
    state = load_file(weights) if weights.endswith(".safetensors") else _torch_state(weights)[0]
    arch, args = config["architecture"], dict(config.get("model_args", {}))
    args.setdefault("num_classes", state["head.weight"].shape[0] if "head.weight" in state else 0)
    try:
        model = timm.create_model(arch, pretrained=False, **args)
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise BadInputError(weights, f"timm cannot load these weights as {arch} with {args}: {exc}") from None
    problems = _timm_problems(model)
    if problems:
        raise BadInputError(weights, f"timm {arch} differs from our ViT: {'; '.join(problems)}")
    heads = model.blocks[0].attn.num_heads
    if num_heads and num_heads != heads:
        raise BadInputError(path, f"--num-heads {num_heads}: the timm model has {heads} heads")
    notes: list = []
    state = clean(state, notes)
    require_vit(state, weights)
    source = Source(path, f"timm {arch}", state, 0 if model.no_embed_class else model.num_prefix_tokens, heads,
                    layer_scale_init=float(args.get("init_values") or 1e-5), notes=notes)
    source.reference, source.reference_name = model.eval().forward_features, f"timm {arch} (forward_features)"
    return source


def hf_to_timm(state: dict) -> dict:
    """transformers ViT / Dinov2 names -> timm's: q/k/v packed into ``qkv``, SwiGLU gate/up into ``fc1``."""
    out, packed = {}, {}
    for key, value in state.items():
        match = HF_PACKED.match(key)
        if match:
            index, qkv, glu, kind = match.groups()
            target = f"blocks.{index}.{'attn.qkv' if qkv else 'mlp.fc1'}.{kind}"
            packed.setdefault(target, {})[qkv or glu] = value
            continue
        for pattern, name in HF_RENAMES:
            renamed, hits = re.subn(pattern, name, key)
            if hits:
                key = renamed
                break
        out[key] = value  # an unknown name stays, for the strict load to name it
    for target, pieces in packed.items():
        if ".attn.qkv." in target:  # DINOv3 has no key bias: zeros (and model.key_bias=false keeps them so)
            out[target] = torch.cat([pieces.get(part, torch.zeros_like(pieces["q"])) for part in ("q", "k", "v")])
        else:  # SwiGLU [gate | up], or a GELU MLP's up projection alone (DINOv3)
            out[target] = torch.cat([pieces["gate"], pieces["up"]]) if "gate" in pieces else pieces["up"]
    return out


def read_transformers(path: str, config: dict, num_heads: Optional[int]) -> Source:
    """A transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel folder."""
    from transformers import AutoModel

    kind = config["model_type"]
    if kind not in TRANSFORMERS_TYPES:
        raise BadInputError(os.path.join(path, "config.json"), f"transformers model_type {kind!r}: supported are "
                                                               f"{list(TRANSFORMERS_TYPES)}")
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    hf = model.config
    gated = bool(getattr(hf, "use_gated_mlp", False) or getattr(hf, "use_swiglu_ffn", False))
    if gated and kind == "dinov3_vit" and hf.hidden_act != "silu":
        raise BadInputError(path, f"a gated MLP with hidden_act {hf.hidden_act!r}: ours is SwiGLU ('silu')")
    if not gated and hf.hidden_act != "gelu":
        raise BadInputError(path, f"hidden_act {hf.hidden_act!r}: ours is exact GELU ('gelu')")
    if num_heads and num_heads != hf.num_attention_heads:
        raise BadInputError(path, f"--num-heads {num_heads}: the model has {hf.num_attention_heads} heads")
    notes: list = []
    rope = kind == "dinov3_vit"
    if hf.layer_norm_eps != 1e-6 and not rope:
        notes.append(f"layer_norm_eps {hf.layer_norm_eps:g} in the source, 1e-6 in ours")
    timm_named = hf_to_timm(model.state_dict())
    if rope and "mask_token" in timm_named:
        timm_named["mask_token"] = timm_named["mask_token"].reshape(1, -1)  # [1, 1, D] there
    state = clean(timm_named, notes)
    require_vit(state, path, table=not rope)
    name = type(model).__name__
    source = Source(path, f"transformers {name}", state, 0 if rope else 1, hf.num_attention_heads,
                    layer_scale_init=float(getattr(hf, "layerscale_value", 1e-5)), notes=notes,
                    extras=ibot_mask_token(timm_named), rope=hf_rope(hf) if rope else None,
                    norm_eps=float(hf.layer_norm_eps) if rope else 1e-6, img_size=hf_img_size(hf),
                    key_bias=bool(getattr(hf, "key_bias", True)))
    source.reference = lambda images: model(pixel_values=images).last_hidden_state
    source.reference_name = f"transformers {name} (last_hidden_state)"
    return source


def read_source(path: str, num_heads: Optional[int] = None, norm_eps: Optional[float] = None) -> Source:
    """Detect the format of ``path`` and read it.

    Raises:
        BadInputError: the path does not exist or is none of the supported formats.
    """
    if not os.path.exists(path):
        raise BadInputError(path, "no such file or folder")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as handle:
            config = json.load(handle)
    if os.path.isdir(path) and "model_type" in config:
        return read_transformers(path, config, num_heads)
    if "architecture" in config and (os.path.isdir(path) or path.endswith(".safetensors")):
        return read_timm(path, config, num_heads)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return read_state_dict(path, load_file(path), num_heads)
    if os.path.isfile(path) and path.endswith((".pth", ".pt")):
        return read_torch(path, num_heads, norm_eps)
    raise BadInputError(path, "unknown format: expected a transformers folder (config.json with model_type), a timm "
                              "folder or .safetensors (config.json with architecture), or an MAE / DINOv2 .pth")
