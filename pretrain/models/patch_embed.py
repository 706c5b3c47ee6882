"""Patch-embedding stems: images to token sequences."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed2D(nn.Module):
    """Non-overlapping p x p patches of a C-channel image, linearly projected.

    The module is named and laid out like timm's ``PatchEmbed`` (``proj`` conv), so
    exported weights load into timm unchanged.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple:
        """Patch grid (rows, cols) for an image of this size."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image {height}x{width} is not divisible by patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def patch_shape(self) -> tuple:
        """The shape of the smallest input, one patch: (C, p, p)."""
        return self.in_chans, self.patch_size, self.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] -> tokens [B, (H/p)*(W/p), D], row-major."""
        if images.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans}-channel images, got shape {tuple(images.shape)}")
        return self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # only the input is cast


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images: [B, C, H, W] -> patches [B, N, p*p*C] (row-major patches, pixel-major within)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid: tuple) -> torch.Tensor:
    """patches: [B, N, p*p*C] -> images [B, C, H, W]; inverse of patchify."""
    b = patches.shape[0]
    p = patch_size
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, gh * p, gw * p)


class PatchEmbed3D(nn.Module):
    """Non-overlapping t x p x p tubelets of a clip ``[B, C, T, H, W]`` (or d x p x p blocks of a volume
    ``[B, C, D, H, W]``), linearly projected (a ``Conv3d`` named ``proj``).

    Args:
        tubelet: frames (or slices) per token.
        patch_size: pixels per token side.
    """

    def __init__(self, tubelet: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.tubelet = tubelet
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet, patch_size, patch_size),
                              stride=(tubelet, patch_size, patch_size))

    def grid(self, frames: int, height: int, width: int) -> tuple:
        """Token grid (t, rows, cols) of an input of this size."""
        if frames % self.tubelet or height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {frames}x{height}x{width} is not divisible by tubelet {self.tubelet} x "
                             f"patch {self.patch_size}")
        return frames // self.tubelet, height // self.patch_size, width // self.patch_size

    def patch_shape(self) -> tuple:
        """The shape of the smallest input, one tubelet: (C, t, p, p)."""
        return self.in_chans, self.tubelet, self.patch_size, self.patch_size

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: [B, C, T, H, W] -> tokens [B, t*h*w, D], time-major then row-major."""
        if clips.ndim != 5 or clips.shape[1] != self.in_chans:
            raise ValueError(f"expected [B, {self.in_chans}, T, H, W] clips, got shape {tuple(clips.shape)}")
        return self.proj(clips.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


def patchify_3d(clips: torch.Tensor, tubelet: int, patch_size: int) -> torch.Tensor:
    """clips: [B, C, T, H, W] -> tubelets [B, N, t*p*p*C] (token order of PatchEmbed3D; pixels time-major,
    then row, column, channel)."""
    b, c, t, h, w = clips.shape
    x = clips.reshape(b, c, t // tubelet, tubelet, h // patch_size, patch_size, w // patch_size, patch_size)
    x = torch.einsum("bcTtHpWq->bTHWtpqc", x)
    return x.reshape(b, (t // tubelet) * (h // patch_size) * (w // patch_size), tubelet * patch_size ** 2 * c)


def unpatchify_3d(tubelets: torch.Tensor, tubelet: int, patch_size: int, channels: int, grid: tuple) -> torch.Tensor:
    """tubelets: [B, N, t*p*p*C] -> clips [B, C, T, H, W]; inverse of patchify_3d."""
    b = tubelets.shape[0]
    gt, gh, gw = grid
    x = tubelets.reshape(b, gt, gh, gw, tubelet, patch_size, patch_size, channels)
    x = torch.einsum("bTHWtpqc->bcTtHpWq", x)
    return x.reshape(b, channels, gt * tubelet, gh * patch_size, gw * patch_size)
