"""DINOv3's rotary position embedding (``model.pos_embed=rope``) for 2D patch grids.

A patch's position is its centre, ``(i + 0.5) / rows`` and ``(j + 0.5) / cols`` mapped to [-1, 1]
(each axis normalised separately). With ``head_dim / 4`` frequencies ``f_k = base^(-4k / head_dim)``
the angles are ``2 pi * [y f_0..., x f_0...]``, repeated twice to fill the head; q and k of the
patch tokens become ``q cos + rotate_half(q) sin``, and the prefix tokens (class, registers) are
left as they are (cos 1, sin 0). In training the coordinates may be augmented as DINOv3 does:
shifted by U(-shift, shift) per axis, scaled per axis by a log-uniform factor in [1/jitter, jitter],
then together by one in [1/rescale, rescale] (0 = off), one draw per block and crop group, as DINOv3's
backbone draws them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

Tables = Tuple[torch.Tensor, torch.Tensor]
"""(cos, sin), each [N, head_dim] (or [1, N, head_dim] for a packed row)."""


@dataclass(frozen=True)
class Rope:
    """The rotary embedding's settings (``model.rope_*``)."""

    head_dim: int
    base: float = 100.0
    shift: float = 0.0
    jitter: float = 0.0
    rescale: float = 0.0

    def __post_init__(self):
        if self.head_dim % 4:
            raise ValueError(f"rotary positions need a head width divisible by 4, got {self.head_dim}")

    def coords(self, grid: tuple, device: torch.device, training: bool) -> torch.Tensor:
        """[rows * cols, 2] patch centres (y, x) in [-1, 1], augmented in training."""
        rows, cols = grid
        ys = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
        xs = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2 - 1
        if not training:
            return coords
        if self.shift:
            coords = coords + torch.empty(1, 2, device=device).uniform_(-self.shift, self.shift)
        if self.jitter:
            coords = coords * torch.empty(1, 2, device=device).uniform_(-math.log(self.jitter),
                                                                        math.log(self.jitter)).exp()
        if self.rescale:
            coords = coords * torch.empty(1, device=device).uniform_(-math.log(self.rescale),
                                                                     math.log(self.rescale)).exp()
        return coords

    def tables(self, grid: tuple, prefix: int, device: torch.device, dtype: torch.dtype, training: bool) -> Tables:
        """(cos, sin) [prefix + rows * cols, head_dim] for a sequence of ``prefix`` tokens then the grid."""
        steps = torch.arange(0, 1, 4 / self.head_dim, device=device, dtype=torch.float32)
        frequencies = 1.0 / self.base ** steps  # [head_dim / 4]
        angles = 2 * math.pi * self.coords(grid, device, training)[:, :, None] * frequencies  # [N, 2, hd / 4]
        angles = angles.flatten(1).tile(2)  # [N, head_dim]
        cos = torch.cat([angles.new_ones(prefix, self.head_dim), angles.cos()])
        sin = torch.cat([angles.new_zeros(prefix, self.head_dim), angles.sin()])
        return cos.to(dtype), sin.to(dtype)


def square_grid(patches: int) -> tuple:
    """The (side, side) grid of ``patches`` tokens (rotary positions here know square crops only)."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"rotary positions need a square patch grid, got {patches} patch tokens")
    return side, side


def packed_tables(parts: List[Tables], counts: List[int]) -> Tables:
    """One packed row's tables: each group's [N_i, head_dim] tables repeated for its ``counts[i]`` sequences."""
    cos = torch.cat([c.repeat(n, 1) for (c, _), n in zip(parts, counts)])[None]
    sin = torch.cat([s.repeat(n, 1) for (_, s), n in zip(parts, counts)])[None]
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension's halves."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply(q: torch.Tensor, k: torch.Tensor, tables: Optional[Tables]) -> tuple:
    """q, k [B, heads, N, head_dim] rotated by ``tables`` ([N, hd] or [1, N, hd]); unchanged without tables."""
    if tables is None:
        return q, k
    cos, sin = (t.unsqueeze(-3).to(q.dtype) for t in tables)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
