"""The shifted and flipped views of post-hoc registers (PH-Reg) and the teacher's features mapped back from them.

A view moves the image by a whole number of patches ``(dy, dx)`` (what leaves the frame is dropped, what enters
is ``fill``) and then mirrors it left-right where ``flip`` is 1. With ``h x w`` patches, the teacher's token at
patch ``(i, j)`` of a view saw the original patch ``(i - dy, j' - dx)``, ``j' = w - 1 - j`` if flipped else
``j``; so the denoised target of original patch ``(a, b)`` is the mean, over the views where
``(a + dy, b + dx)`` lies inside the grid, of the view's token at row ``a + dy`` and column ``b + dx`` (mirrored
as ``w - 1 - (b + dx)`` where flipped). View 0 is the image itself, so every patch has one view at least.

Everything is gathered by index on the device: no host-device synchronisation.
"""
from __future__ import annotations

import torch


def register_views(seeds: torch.Tensor, views: int, max_shift: int) -> dict:
    """{'register_views': [B, views, 3] int64 (dy, dx, flip)}: view 0 the identity, the others shifts drawn
    uniformly in ``[-max_shift, max_shift]`` patches per axis and a flip with probability 1/2, each sample from
    its own seed (:class:`pretrain.objectives.masking.PerSample`)."""
    gen = torch.Generator()
    rows = []
    for seed in seeds.tolist():
        gen.manual_seed(int(seed))
        shifts = torch.randint(-max_shift, max_shift + 1, (views, 2), generator=gen)
        flips = torch.randint(0, 2, (views, 1), generator=gen)
        drawn = torch.cat([shifts, flips], dim=1)
        drawn[0] = 0
        rows.append(drawn)
    return {"register_views": torch.stack(rows)}


def shift_flip_images(images: torch.Tensor, views: torch.Tensor, patch: int, fill: float = 0.0) -> torch.Tensor:
    """[B, C, H, W] images and [B, K, 3] views -> [B * K, C, H, W], sample-major (row ``b * K + k``)."""
    batch, _, height, width = images.shape
    dy, dx, flip = (views[..., index] for index in range(3))
    rows = torch.arange(height, device=images.device) - (dy * patch)[..., None]  # [B, K, H] source rows
    cols = torch.arange(width, device=images.device).expand(*views.shape[:2], width)
    cols = torch.where(flip[..., None].bool(), width - 1 - cols, cols) - (dx * patch)[..., None]  # [B, K, W]
    inside = ((rows >= 0) & (rows < height))[..., :, None] & ((cols >= 0) & (cols < width))[..., None, :]
    sample = torch.arange(batch, device=images.device)[:, None, None, None]
    picked = images[sample, :, rows.clamp(0, height - 1)[..., :, None], cols.clamp(0, width - 1)[..., None, :]]
    picked = torch.where(inside[..., None], picked, torch.full_like(picked, fill))  # [B, K, H, W, C]
    return picked.permute(0, 1, 4, 2, 3).flatten(0, 1)


def unshift_features(features: torch.Tensor, views: torch.Tensor, grid: tuple) -> torch.Tensor:
    """[B * K, h * w, D] patch features of the views (sample-major) -> [B, h * w, D] on the original grid: the
    mean over the views that saw each patch."""
    batch, count = views.shape[:2]
    height, width = grid
    maps = features.reshape(batch, count, height, width, features.shape[-1])
    dy, dx, flip = (views[..., index] for index in range(3))
    rows = torch.arange(height, device=features.device) + dy[..., None]  # [B, K, h]
    cols = torch.arange(width, device=features.device) + dx[..., None]  # [B, K, w]
    seen = ((rows >= 0) & (rows < height))[..., :, None] & ((cols >= 0) & (cols < width))[..., None, :]
    cols = torch.where(flip[..., None].bool(), width - 1 - cols, cols)
    sample = torch.arange(batch, device=features.device)[:, None, None, None]
    view = torch.arange(count, device=features.device)[None, :, None, None]
    picked = maps[sample, view, rows.clamp(0, height - 1)[..., :, None], cols.clamp(0, width - 1)[..., None, :]]
    weight = seen[..., None].to(picked.dtype)
    mean = (picked * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
    return mean.flatten(1, 2)


def high_norm_share(norms: torch.Tensor, multiple: float) -> torch.Tensor:
    """The share of [B, N] token norms above ``multiple`` times their image's median."""
    median = norms.median(dim=1, keepdim=True).values
    return (norms > multiple * median).float().mean()
