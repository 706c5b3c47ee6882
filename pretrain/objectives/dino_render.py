"""Images a DINOv2 run logs: the teacher's class-token attention, and patch-feature similarity maps.

Plain functions of encoders and a batch's global crops, returning uint8 arrays for the tracker.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F


def unit(x: torch.Tensor) -> torch.Tensor:
    """Each of ``x`` [R, 1, H, W] scaled to [0, 1] by its own minimum and maximum."""
    low = x.flatten(1).min(1).values[:, None, None, None]
    high = x.flatten(1).max(1).values[:, None, None, None]
    return (x - low) / (high - low + 1e-8)


def as_image(columns: List[torch.Tensor]) -> np.ndarray:
    """Side-by-side columns [R, 1, H, W] each in [0, 1], one row per image -> uint8 [R * H, columns * W]."""
    rows = torch.cat(columns, dim=3)
    grid = torch.cat([rows[i] for i in range(rows.shape[0])], dim=1)
    return (grid[0] * 255).round().byte().cpu().numpy()


def on_pixels(values: torch.Tensor, grid: tuple, size: tuple) -> torch.Tensor:
    """Per-patch values [R, P] -> [R, 1, H, W], each patch a block of pixels."""
    return F.interpolate(values.reshape(-1, 1, *grid).float(), size=size, mode="nearest")


def image_grid(encoder, images: torch.Tensor) -> tuple:
    """The patch grid of ``images`` [..., H, W] (a stage's side may not be the encoder's built one)."""
    return images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size


@torch.no_grad()
def class_attention_map(encoder, images: torch.Tensor, stem: Optional[str]) -> np.ndarray:
    """One row per image: the image | ``encoder``'s class-token attention over its patches (mean over heads)."""
    attention = encoder.class_attention(images, stem).mean(dim=1)  # [R, patches]
    shown = unit(images.mean(dim=1, keepdim=True))
    return as_image([shown, unit(on_pixels(attention, image_grid(encoder, images), images.shape[-2:]))])


@torch.no_grad()
def patch_similarity_map(encoders: List, image: torch.Tensor, stem: Optional[str]) -> np.ndarray:
    """One image [1, C, H, W] | for each encoder, the cosine similarity of its final patch tokens to the centre
    patch's (where its patch features keep locality, a blob around the centre; where they degrade, noise)."""
    columns = [unit(image.mean(dim=1, keepdim=True))]
    for encoder in encoders:
        tokens = F.normalize(encoder(image, stem)[:, encoder.num_prefix_tokens:].float(), dim=-1)  # [1, P, D]
        rows, cols = grid = image_grid(encoder, image)
        centre = tokens[:, (rows // 2) * cols + cols // 2]
        similarity = (tokens @ centre[:, :, None])[..., 0]  # [1, P] in [-1, 1]
        columns.append(on_pixels((similarity + 1) / 2, grid, image.shape[-2:]).clamp(0, 1))
    return as_image(columns)


def dino_images(teacher, gram_teacher, batch: dict, rows: int = 4) -> Dict[str, np.ndarray]:
    """{'attention': the EMA teacher's class attention on the first global crop of ``rows`` images,
    'patch_similarity': the first image's centre-patch similarity map under the EMA teacher (and the Gram
    teacher, where one runs)}."""
    images = batch["global_crops"][:rows, 0].float()
    stem = batch.get("stem")
    encoders = [teacher] + ([gram_teacher] if gram_teacher is not None else [])
    return {"attention": class_attention_map(teacher, images, stem),
            "patch_similarity": patch_similarity_map(encoders, images[:1], stem)}
