"""Load an exported encoder the way a downstream team would: with timm, and with transformers.

    python examples/use_exported_encoder.py runs/mae_tiny_cpu/exports/step_000060

Neither loader needs this project's code: only the bundle folder, timm or transformers,
and the preprocessing contract in preprocessing.json.
"""
import json
import os
import sys

import timm
import torch
from safetensors.torch import load_file
from transformers import AutoModel


def load_with_timm(bundle: str) -> torch.nn.Module:
    """The encoder as a timm VisionTransformer (rotary positions: an Eva), no classifier head."""
    with open(os.path.join(bundle, "config.json")) as handle:
        config = json.load(handle)
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file(os.path.join(bundle, "model.safetensors")), strict=True)
    return model.eval()


def load_with_transformers(bundle: str) -> torch.nn.Module:
    """The encoder as a transformers model (ViTModel, Dinov2WithRegistersModel or DINOv3ViTModel), offline."""
    return AutoModel.from_pretrained(os.path.join(bundle, "hf"), local_files_only=True).eval()


def preprocess(pixels: torch.Tensor, bundle: str) -> torch.Tensor:
    """uint16 images [B, H, W] already at the training size -> normalised model input [B, C, H, W]."""
    with open(os.path.join(bundle, "preprocessing.json")) as handle:
        contract = json.load(handle)
    x = pixels.float().div(65535.0).unsqueeze(1).expand(-1, contract["in_chans"], -1, -1)
    mean = torch.tensor(contract["mean"])[None, :, None, None]
    std = torch.tensor(contract["std"])[None, :, None, None]
    return (x - mean) / std


def main(bundle: str) -> None:
    """Extract features with both loaders and show they agree."""
    with open(os.path.join(bundle, "preprocessing.json")) as handle:
        size = json.load(handle)["img_size"]
    pixels = torch.randint(0, 65536, (2, size, size), generator=torch.Generator().manual_seed(0))
    images = preprocess(pixels, bundle)
    with torch.no_grad():
        timm_features = load_with_timm(bundle).forward_features(images)
        hf_features = load_with_transformers(bundle)(pixel_values=images).last_hidden_state
    print(f"timm features {tuple(timm_features.shape)}, transformers features {tuple(hf_features.shape)}")
    print(f"class-token embedding (timm): {timm_features[:, 0].shape}; "
          f"max difference between loaders: {(timm_features - hf_features).abs().max():.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
