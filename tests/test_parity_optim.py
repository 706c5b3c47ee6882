"""Parity of the optimizer's parameter groups with the references: every parameter's lr scale and weight-decay
flag, for every shipped recipe, against the reference rules written out here from their code.

Mirrors dinov2/utils/param_groups.py (get_vit_lr_decay_rate, get_params_groups_with_decay) for layer-wise
decay and the patch-embedding multiplier, which MAE's util/lr_decay.py (param_groups_lrd) shares, and timm's
add_weight_decay (used by MAE and VideoMAE V2 pretraining) for weight decay. Our names are mapped to the
reference's first: the encoder is DINOv2's ``backbone``, ``reg_token`` its ``register_tokens``, the DINOv2
student's ``mask_token`` its ``backbone.mask_token``, and an extra stem ``stems.X`` a patch embedding.
"""
from __future__ import annotations

import glob
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.config import load_config
from pretrain.objectives import build_objective
from pretrain.optim import param_groups
from tests.conftest import REPO

RECIPES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "pretrain", "configs", "*.yaml"))
                 if OmegaConf.load(p).objective.name != "distill")  # a student and its projectors: no reference
TOKENS = ("cls_token", "register_tokens", "mask_token", "pos_embed")


def reference_name(ours: str, objective: str) -> str:
    """Our parameter name as the reference code names it."""
    if objective == "dinov2" and ours == "mask_token":
        return "backbone.mask_token"
    name = "backbone." + ours[len("encoder."):] if ours.startswith("encoder.") else ours
    name = name.replace(".reg_token", ".register_tokens")
    return re.sub(r"^backbone\.stems\.(\w+)\.", r"backbone.patch_embed_\1.", name)


def reference_lr_scale(name: str, depth: int, decay: float, patch_embed_mult: float) -> float:
    """lr multiplier: decay^(depth + 1 - layer), layer 0 below the blocks, i + 1 in block i, depth + 1 after;
    times the patch-embedding multiplier."""
    layer = depth + 1
    if name.startswith("backbone"):
        if any(key in name for key in (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".register_tokens")):
            layer = 0
        elif ".blocks." in name:
            layer = int(name[name.find(".blocks."):].split(".")[2]) + 1
    scale = decay ** (depth + 1 - layer)
    return scale * patch_embed_mult if "patch_embed" in name else scale


def reference_decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies except to vectors and biases (timm add_weight_decay; DINOv2 adds norms and
    LayerScale gammas, all vectors here), and except to tokens: our deliberate difference."""
    if param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name:
        return False
    return not any(token in name for token in TOKENS)


def table(recipe: str, overrides=()) -> tuple:
    cfg = load_config(os.path.join(REPO, "pretrain", "configs", f"{recipe}.yaml"), list(overrides))
    with torch.device("meta"):  # ViT-g's table without its 4 GB
        objective = build_objective(cfg)
    model, optim = objective.trainable(), cfg.optim
    depth = len(objective.encoder().blocks)
    groups = param_groups(model, optim.weight_decay, optim.layer_decay, depth, optim.patch_embed_lr_mult)
    ours = {name: (group["lr_scale"], group["wd_scale"] == 1.0) for group in groups for name in group["names"]}
    params = dict(model.named_parameters())
    expected = {}
    for name in ours:
        ref = reference_name(name, cfg.objective.name)
        expected[name] = (reference_lr_scale(ref, depth, optim.layer_decay, optim.patch_embed_lr_mult),
                          reference_decays(ref, params[name]))
    return ours, expected, cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_parameter_has_the_reference_lr_scale_and_decay(recipe):
    ours, expected, _ = table(recipe)
    wrong = {name: (ours[name], expected[name]) for name in ours
             if ours[name][1] != expected[name][1] or ours[name][0] != pytest.approx(expected[name][0], rel=1e-12)}
    assert not wrong, f"{recipe}: (ours, reference) differ for {wrong}"


def test_dinov2_mask_token_sits_with_the_patch_embedding_and_the_decoder_mask_token_at_the_top():
    ours, _, cfg = table("dinov2_vitl_pathology")
    assert ours["mask_token"][0] == pytest.approx(0.9 ** 25)  # not 1.0: it used to learn ~14x too fast
    assert ours["encoder.patch_embed.proj.weight"][0] == pytest.approx(0.9 ** 25 * 0.2)
    mae, _, _ = table("mae_vit_xray", ["optim.layer_decay=0.75"])
    assert mae["mask_token"][0] == 1.0 and mae["encoder.cls_token"][0] == pytest.approx(0.75 ** 13)


def test_extra_stems_are_patch_embeddings():
    ours, expected, _ = table("mae_mixture_cpu", ["optim.layer_decay=0.75", "optim.patch_embed_lr_mult=0.5"])
    stems = [name for name in ours if ".stems." in name]
    assert stems and all(ours[name] == pytest.approx(ours["encoder.patch_embed.proj.weight"]) or name.endswith("bias")
                         for name in stems)
    assert ours["encoder.stems.ct.proj.weight"][0] == pytest.approx(0.75 ** 3 * 0.5)
    assert all(ours[name][0] == pytest.approx(expected[name][0]) for name in stems)
