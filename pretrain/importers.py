"""`pretrain import`: published ViT weights -> an import folder that ``checkpoint.init_from`` loads.

The sources (transformers ViT / Dinov2 folders, timm folders and safetensors, MAE checkpoints, DINOv2
backbones) are read by :mod:`pretrain.import_sources` into timm's ``VisionTransformer`` names, which
ours share. Then:

- the positions of the prefix tokens (timm, transformers, DINOv2 and MAE give the class token one) are
  folded into those tokens (``cls_token + pos_embed[:, :1]``). This is exact for features: a prefix
  token's position is a constant added to it, and ours adds positions to patch tokens only;
- the patch table becomes ``model.pos_embed`` 'sincos' or 'sincos_mae' when it is that fixed table
  within 1e-5 (MAE's is 'sincos_mae'), else 'learned' (a trained table, as timm / DINOv2 have).

The import folder holds ``model.safetensors`` (our encoder's state dict + ``pos_embed`` [1, N, D], the
layout of an export bundle), ``config.json`` (timm's architecture and arguments, so timm loads it too,
and ``pretrain_model``: the ``model.*`` settings ``checkpoint.init_from`` checks the run against) and
``import.json`` (source, format, overrides, notes, measured parity). The folder's encoder is rebuilt
through the init_from loader and compared with the source model (timm / transformers) or, for .pth
sources, a timm ``VisionTransformer`` loading the same weights (DINOv2's through timm's own converter)
on random images in fp32; a difference above ``atol`` is an error.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from data_pipeline.errors import BadInputError
from pretrain import bundles
from pretrain.bundles import build_encoder
from pretrain.import_sources import Source, read_source
from pretrain.models.pos_embed import fixed_mode
from pretrain.models.blocks import mlp_ratio_for
from pretrain.models.vit import VIT_PRESETS, VisionTransformer

log = logging.getLogger(__name__)


def infer_fields(source: Source) -> dict:
    """The ``model.*`` settings of our encoder for a source's weights (shapes, heads, position table)."""
    state, path = source.state, source.path
    dim = state["cls_token"].shape[-1]
    proj = state["patch_embed.proj.weight"]
    rows = (source.img_size // proj.shape[-1]) ** 2 if source.rope else state["pos_embed"].shape[1] - source.pos_prefix
    side = math.isqrt(rows)
    if side * side != rows:
        raise BadInputError(path, f"pos_embed holds {rows} patch positions: not a square grid")
    hidden = state["blocks.0.mlp.fc2.weight"].shape[1]
    ffn = "swiglu" if state["blocks.0.mlp.fc1.weight"].shape[0] == 2 * hidden else "mlp"
    try:
        ratio = mlp_ratio_for(ffn, dim, hidden)
    except ValueError as exc:
        raise BadInputError(path, str(exc)) from None
    fields = {"embed_dim": dim, "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
              "num_heads": source.num_heads, "mlp_ratio": ratio, "patch_size": proj.shape[-1],
              "img_size": side * proj.shape[-1], "in_chans": proj.shape[1],
              "num_registers": state["reg_token"].shape[1] if "reg_token" in state else 0,
              "layer_scale_init": source.layer_scale_init if "blocks.0.ls1.gamma" in state else 0.0, "ffn": ffn,
              "pos_embed": "rope" if source.rope else fixed_mode(state["pos_embed"][0, source.pos_prefix:], (side, side)),
              "frames": 0}
    if source.rope:
        fields.update({f"rope_{name}": value for name, value in source.rope.items()}, norm_eps=source.norm_eps)
    if not source.key_bias:
        fields["key_bias"] = False
    if source.format == "mae" and fields["pos_embed"] == "learned":  # MAE's table is fixed: say why it is not here
        source.notes.append("the position table matches no fixed sin-cos table within 1e-5: imported as learned")
    return {"size": size_for(fields), **fields}


def size_for(fields: dict) -> str:
    """The preset of this shape (width, depth, heads), else of this width, else B: a label, every field being set."""
    shape = (fields["embed_dim"], fields["depth"], fields["num_heads"])
    for size, preset in VIT_PRESETS.items():
        if preset[:3] == shape:
            return size
    return next((size for size, preset in VIT_PRESETS.items() if preset[0] == shape[0] and size != "tiny"), "B")


def our_state(source: Source, fields: dict) -> dict:
    """The source's weights under our encoder's names: prefix positions folded into their tokens, the patch
    table kept when it is learned (a fixed one is rebuilt by the encoder)."""
    state = dict(source.state)
    pos = state.pop("pos_embed", None)
    prefix = source.pos_prefix
    if prefix:
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        source.notes.append("class-token position folded into the class token (cls_token + pos_embed[:, :1]): "
                            "exact for features")
    if prefix > 1:
        if "reg_token" not in state:
            raise BadInputError(source.path, f"{prefix} prefix positions but no register tokens: an encoder with "
                                             "other prefix tokens (a distillation token?) is not a ViT of ours")
        state["reg_token"] = state["reg_token"] + pos[:, 1:prefix]
    if fields["pos_embed"] == "learned":
        state["pos_embed"] = pos[:, prefix:]
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def timm_reference(source: Source, fields: dict) -> Tuple[Optional[Callable], str]:
    """(features of a timm VisionTransformer loading the source's weights, its description), or (None, '')
    where timm has no such layout (class-only positions with registers, outside DINOv2)."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer as TimmViT, checkpoint_filter_fn

    registers, prefix = fields["num_registers"], source.pos_prefix
    if source.rope:  # timm's VisionTransformer has no rotary positions
        return None, ""
    if source.dinov2_raw is not None:  # timm's converter folds the class position where there are registers
        no_embed_class = registers > 0
    elif prefix in (0, 1 + registers):
        no_embed_class = prefix == 0
    else:
        return None, ""
    dim, hidden = fields["embed_dim"], source.state["blocks.0.mlp.fc2.weight"].shape[1]
    swiglu = fields["ffn"] == "swiglu"
    model = TimmViT(img_size=fields["img_size"], patch_size=fields["patch_size"], in_chans=fields["in_chans"],
                    embed_dim=dim, depth=fields["depth"], num_heads=fields["num_heads"],
                    mlp_ratio=((2 if swiglu else 1) * hidden + 0.5) / dim, class_token=True, reg_tokens=registers,
                    no_embed_class=no_embed_class, init_values=1e-5 if fields["layer_scale_init"] else None,
                    num_classes=0, global_pool="token",
                    **({"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU} if swiglu else {}))
    if source.dinov2_raw is not None:
        weights, how = checkpoint_filter_fn(dict(source.dinov2_raw), model), "timm's DINOv2 converter"
    else:
        weights, how = source.state, "the same weights"
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise BadInputError(source.path, f"a timm VisionTransformer of {fields} cannot load these weights: {exc}")
    return model.eval().forward_features, f"timm VisionTransformer loading {how} (forward_features)"


def parity(encoder: nn.Module, reference: Callable, fields: dict, batch: int = 2) -> float:
    """Max abs difference of ``encoder``'s features and ``reference``'s on fixed random images (fp32, eval)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, fields["in_chans"], fields["img_size"], fields["img_size"], generator=generator)
    with torch.no_grad():
        return float((encoder.eval()(images) - reference(images)).abs().max())


def write_folder(out: str, encoder: VisionTransformer, fields: dict, record: dict,
                 extras: Optional[dict] = None) -> None:
    """model.safetensors, config.json (timm's architecture + ``pretrain_model``), import.json and, when the
    source has them, extras.safetensors (DINOv2's iBOT mask token) into ``out``."""
    from safetensors.torch import save_file

    from pretrain.config import ModelConfig
    from pretrain.export import timm_config, timm_state_dict

    os.makedirs(out, exist_ok=True)
    save_file(timm_state_dict(encoder), os.path.join(out, bundles.BUNDLE_WEIGHTS), metadata={"format": "pt"})
    extras_path = os.path.join(out, bundles.BUNDLE_EXTRAS)
    if extras:
        save_file(extras, extras_path, metadata={"format": "pt"})
    elif os.path.exists(extras_path):  # an earlier import's into the same folder
        os.remove(extras_path)
    config = {**timm_config(ModelConfig(**fields), encoder), "pretrain_model": fields}
    with open(os.path.join(out, bundles.BUNDLE_CONFIG), "w") as handle:
        json.dump(config, handle, indent=2)
    write_record(out, record)


def write_record(out: str, record: dict) -> None:
    """import.json: what was imported from where, and the parity check's outcome (``init_from`` refuses an
    import whose check failed)."""
    with open(os.path.join(out, bundles.IMPORT_RECORD), "w") as handle:
        json.dump(record, handle, indent=2)


def import_weights(src: str, out: str, num_heads: Optional[int] = None, verify: bool = True,
                   atol: float = 1e-5, norm_eps: Optional[float] = None) -> dict:
    """Convert ``src`` into the import folder ``out`` and check the folder's encoder against the source.

    Args:
        num_heads: the head count of a .pth source (not in its weights); default: the published count of
            its width, else 64-wide heads.
        norm_eps: the LayerNorm eps of a DINOv3 .pth (not in its weights; default the hub models' 1e-5).
        verify: compare features with the source (or a timm model on its weights); off for speed only.

    Returns:
        What import.json records: source, format, model (the ``model.*`` settings), overrides, parity
        ({'reference', 'max_abs_difference', 'atol'} or None), notes.

    Raises:
        BadInputError: an unsupported or inconsistent source, or features differing by more than ``atol``.
    """
    source = read_source(src, num_heads, norm_eps)
    fields = infer_fields(source)
    encoder = build_encoder(fields)
    try:
        encoder.load_state_dict(our_state(source, fields), strict=True)
    except RuntimeError as exc:
        raise BadInputError(src, f"the weights do not fit a ViT of {fields}: {exc}") from None
    if source.extras:
        source.notes.append(f"kept beside the encoder for the DINOv2 student: {', '.join(sorted(source.extras))}")
    record = {"source": os.path.abspath(src), "format": source.format, "model": fields,
              "overrides": bundles.overrides(fields), "parity": None, "notes": source.notes}
    write_folder(out, encoder, fields, record, source.extras)
    if not verify:
        return record
    reference, name = ((source.reference, source.reference_name) if source.reference is not None
                       else timm_reference(source, fields))
    if reference is None:
        source.notes.append("no reference model for this position layout: features not compared")
        log.warning("%s: no reference model for this position layout: features not compared", src)
        write_record(out, record)
        return record
    rebuilt = build_encoder(fields)
    bundles.load_encoders([rebuilt], out)  # the folder, read back as init_from reads it
    difference = parity(rebuilt, reference, fields)
    record["parity"] = {"reference": name, "max_abs_difference": difference, "atol": atol,
                        "ok": difference <= atol}
    write_record(out, record)
    if not difference <= atol:
        notes = "; ".join(source.notes)
        raise BadInputError(src, f"the imported encoder's features differ from the {name}'s by {difference:.3g} "
                                 f"(tolerance {atol}; notes: {notes}); {out} is written for inspection, and init_from refuses it "
                                 "until an import with a larger --atol accepts the difference")
    return record
