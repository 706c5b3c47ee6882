"""Sine-cosine position embeddings (ours and MAE's layout) and their resampling to other grids."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sine-cosine features of scalar positions.

    Args:
        dim: even feature width.
        positions: [N] float positions.

    Returns:
        [N, dim]: first half sin, second half cos, frequencies 1 / 10000^(2i/dim).
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """2D sine-cosine embedding of a patch grid, row-major.

    Half of the width encodes the row, half the column.

    Returns:
        [grid_h * grid_w, dim].
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be a multiple of 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


def sincos_2d_mae(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's 2D sine-cosine table (``get_2d_sincos_pos_embed`` without its class row): the first half of
    the width encodes the column, the second the row (its meshgrid order), i.e. :func:`sincos_2d` with
    its halves swapped.

    Returns:
        [grid_h * grid_w, dim].
    """
    table = sincos_2d(dim, grid_h, grid_w)
    return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=1)


POS_EMBEDS = ("sincos", "sincos_mae", "learned")
"""Position tables of a 2D encoder: fixed sin-cos, rows first (ours); fixed sin-cos, columns first (MAE's);
learned (initialised to ours)."""


def table_2d(mode: str, dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The initial [grid_h * grid_w, dim] table of position embedding ``mode`` (one of :data:`POS_EMBEDS`)."""
    if mode not in POS_EMBEDS:
        raise ValueError(f"position embedding {mode!r} is not one of {list(POS_EMBEDS)}")
    return (sincos_2d_mae if mode == "sincos_mae" else sincos_2d)(dim, grid_h, grid_w)


def fixed_mode(table: torch.Tensor, grid: tuple, atol: float = 1e-5) -> str:
    """Which fixed table a [N, D] patch-position table is ('sincos' or 'sincos_mae', within ``atol``), or
    'learned' when it is neither."""
    dim = table.shape[-1]
    if dim % 4 == 0:
        for mode in ("sincos", "sincos_mae"):
            if torch.allclose(table.float(), table_2d(mode, dim, *grid), atol=atol, rtol=0):
                return mode
    return "learned"


def resample_2d(pos: torch.Tensor, old_grid: tuple, new_grid: tuple) -> torch.Tensor:
    """Bicubic resampling of a patch-grid embedding to another grid (as timm does for ViTs).

    Args:
        pos: [N, D] with N = old_grid[0] * old_grid[1].

    Returns:
        [new_grid[0] * new_grid[1], D].
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(-1, dim).to(pos.dtype)


def split_3d(dim: int) -> tuple:
    """(time/depth width, spatial width) of a 3D embedding: about a quarter for time, both multiples of 4."""
    if dim % 8:
        raise ValueError(f"3D sin-cos embedding width must be a multiple of 8, got {dim}")
    time = dim // 4 // 4 * 4
    return time, dim - time


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Separable 3D sine-cosine embedding of a tubelet grid, time-major then row-major.

    Each token is [time features (a quarter of the width) | 2D row/column features of its
    spatial position], so every frame (or slice) shares the spatial code and every position
    shares the time code.

    Returns:
        [grid_t * grid_h * grid_w, dim].
    """
    time_dim, space_dim = split_3d(dim)
    time = sincos_1d(time_dim, torch.arange(grid_t))  # [T, dt]
    space = sincos_2d(space_dim, grid_h, grid_w)  # [H*W, ds]
    return torch.cat([time[:, None].expand(-1, grid_h * grid_w, -1),
                      space[None].expand(grid_t, -1, -1)], dim=-1).reshape(-1, dim)


def resample_3d(pos: torch.Tensor, old_grid: tuple, new_grid: tuple) -> torch.Tensor:
    """Trilinear resampling of a tubelet-grid embedding to another grid ([N, D] -> [N', D])."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(-1, dim).to(pos.dtype)
