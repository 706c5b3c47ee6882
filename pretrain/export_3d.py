"""Export of 3D encoders (video tubelets, CT volume blocks): the config that rebuilds them and a parity check.

timm and transformers have no ViT with a tubelet stem over our trunk, so a 3D bundle names
the class that rebuilds it (``pretrain.models.vit.VisionTransformer``, importable from this
package) with its keyword arguments, including the clip length / crop depth (``frames``) and
the tubelet size. The trunk keeps timm's parameter names; only ``patch_embed.proj`` is a
``Conv3d`` and ``pos_embed`` a separable 3D sine-cosine table.
"""
from __future__ import annotations

import json
import os

import torch

BUILDER = "pretrain.models.vit.VisionTransformer"


def config_3d(encoder) -> dict:
    """What rebuilds a 3D encoder, and how to call it."""
    return {
        "architecture": "pretrain_vit_3d",
        "builder": BUILDER,
        "model_args": {
            "img_size": encoder.img_size, "patch_size": encoder.patch_size, "in_chans": encoder.in_chans,
            "embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": encoder.num_heads,
            "mlp_ratio": encoder.mlp_ratio, "num_registers": encoder.num_registers,
            "layer_scale_init": encoder.layer_scale_init, "ffn": encoder.ffn,
            "frames": encoder.frames, "tubelet": encoder.tubelet,
        },
        "input": "[B, in_chans, frames, img_size, img_size]: a clip (T frames) or a volume crop (D axial slices)",
        "tokens": f"tubelets of {encoder.tubelet} x {encoder.patch_size} x {encoder.patch_size}, time/depth-major",
        "num_features": encoder.embed_dim,
        "num_prefix_tokens": encoder.num_prefix_tokens,
        "features": "forward(x): [B, 1 + registers + tubelets, embed_dim], class token first",
    }


def load_3d(bundle: str):
    """The encoder of a 3D bundle, rebuilt from config.json and loaded strictly from model.safetensors."""
    from safetensors.torch import load_file

    from pretrain.models.vit import VisionTransformer

    with open(os.path.join(bundle, "config.json")) as handle:
        config = json.load(handle)
    model = VisionTransformer(**config["model_args"])
    state = load_file(os.path.join(bundle, "model.safetensors"))
    state.pop("pos_embed")  # a fixed buffer, rebuilt from the arguments
    model.load_state_dict(state, strict=True)
    return model.eval()


def verify_3d(bundle: str, encoder, atol: float = 1e-4, batch: int = 2) -> dict:
    """Rebuild the bundle and compare its features with ``encoder`` on a fixed random clip.

    Raises:
        AssertionError: a difference above ``atol``.
    """
    generator = torch.Generator().manual_seed(0)
    clips = torch.randn(batch, encoder.in_chans, encoder.frames, encoder.img_size, encoder.img_size,
                        generator=generator)
    with torch.no_grad():
        difference = float((load_3d(bundle)(clips) - encoder.eval()(clips)).abs().max())
    if not difference <= atol:
        raise AssertionError(f"{bundle}: rebuilt 3D encoder features differ by {difference:.3g} (tolerance {atol})")
    return {BUILDER: difference}
