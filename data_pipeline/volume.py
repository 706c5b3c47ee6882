"""CT transforms: resampling to a target spacing, HU windows as channels, random 3D crops, 2.5D slabs.

Resampling and cropping are one step: the output grid (a crop of the volume resampled to
``target_spacing``) is mapped to source voxel coordinates and sampled trilinearly with
``grid_sample``, so only the output voxels are computed, whatever the volume's size. Voxels
outside the volume read as air (``air_hu``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.errors import BadInputError


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple:
    """Voxels per axis of a volume of ``shape`` at ``spacing`` once resampled to ``target`` spacing."""
    return tuple(int(math.floor((n - 1) * s / t)) + 1 for n, s, t in zip(shape, spacing, target))


def crop_start(extent: int, size: int, gen: torch.Generator, random: bool = True) -> int:
    """Start of a ``size`` window on an axis of ``extent`` voxels: uniform when it fits, centred (negative
    start = padding) when it does not."""
    if extent <= size:
        return -((size - extent) // 2)
    if not random:
        return (extent - size) // 2
    return int(torch.randint(0, extent - size + 1, (1,), generator=gen).item())


def resample_box(volume, spacing: Sequence[float], target: Sequence[float], start: Sequence[int],
                 size: Sequence[int], air_hu: float, mode: str = "bilinear") -> torch.Tensor:
    """HU of the box ``start .. start + size`` (target voxels, ``[z, y, x]``) of ``volume`` resampled to ``target``.

    Only the source voxels the box touches are read and converted (a 2.5D slab of a 300-slice
    scan reads 3-4 slices), then sampled trilinearly with ``grid_sample``.

    Args:
        volume: ``[D, H, W]`` HU (numpy array or tensor, any dtype) at ``spacing`` mm ``[dz, dy, dx]``.
        start, size: the box in voxels of the resampled grid (may reach outside: air).
        mode: ``bilinear`` (trilinear, for HU) or ``nearest`` (for class ids; ``air_hu`` 0 = background outside).
    Returns:
        float32 ``[d, h, w]`` HU.
    """
    region, axes = [], []
    for n, s, t, a, m in zip(volume.shape, spacing, target, start, size):
        index = (a + torch.arange(m, dtype=torch.float64)) * (t / s)  # source voxel coordinates
        low = min(max(int(math.floor(index.min().item())), 0), n - 1)
        high = min(max(int(math.ceil(index.max().item())), 0), n - 1)
        local, extent = index - low, high - low + 1
        if extent > 1:
            axes.append((local * 2.0 / (extent - 1) - 1.0).float())
        else:  # one voxel: exactly on it, or outside (air)
            axes.append(torch.where(local.abs() < 1e-6, 0.0, 2.0).float())
        region.append(slice(low, high + 1))
    box = volume[tuple(region)]
    box = torch.as_tensor(np.asarray(box, dtype=np.float32)) if not torch.is_tensor(box) else box.float()
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([xx, yy, zz], dim=-1)[None]  # grid_sample wants (x, y, z)
    out = F.grid_sample((box - air_hu)[None, None], grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, 0] + air_hu


def apply_windows(hu: torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """HU ``[...]`` -> ``[len(windows), ...]`` in [0, 1]: each (centre, width) window clipped and scaled."""
    channels = [((hu - (centre - width / 2.0)) / width).clamp(0.0, 1.0) for centre, width in windows]
    return torch.stack(channels)


class VolumeSampler:
    """Turns one stored CT volume into a training input, drawing every random choice from ``gen``.

    Args:
        cfg: :class:`pretrain.config.CTConfig`-like (target_spacing, windows, slices, air_hu).
    """

    def __init__(self, cfg):
        self.target = tuple(float(v) for v in cfg.target_spacing)
        self.windows = [tuple(float(v) for v in w) for w in cfg.windows]
        self.slices = int(cfg.slices)
        self.air_hu = float(cfg.air_hu)
        if len(self.target) != 3 or min(self.target) <= 0:
            raise ValueError(f"target_spacing {cfg.target_spacing} must be 3 positive mm values [z, y, x]")
        if not self.windows or any(len(w) != 2 or w[1] <= 0 for w in self.windows):
            raise ValueError(f"windows {cfg.windows} must be [centre, width > 0] HU pairs")

    @property
    def slab_channels(self) -> int:
        """Channels of a 2.5D slab: slices x windows."""
        return self.slices * len(self.windows)

    @staticmethod
    def check(volume: np.ndarray, meta: dict, where: str) -> tuple:
        """The volume and its spacing, after checking both (float volumes must be finite)."""
        spacing = meta.get("spacing") if isinstance(meta, dict) else None
        if volume.ndim != 3 or min(volume.shape) < 1:
            raise BadInputError(where, f"expected a [z, y, x] volume, got shape {volume.shape}")
        if not spacing or len(spacing) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in spacing):
            raise BadInputError(where, f"metadata 'spacing' must be 3 positive numbers, got {spacing!r}")
        if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
            raise BadInputError(where, "volume has non-finite voxels")
        return volume, [float(v) for v in spacing]

    def crop(self, volume: np.ndarray, meta: dict, size: Sequence[int], gen: torch.Generator,
             where: str) -> torch.Tensor:
        """A random ``size`` = (d, h, w) crop at the target spacing -> ``[windows, d, h, w]`` in [0, 1];
        the centred crop when ``gen`` is None (evaluation)."""
        tensor, spacing = self.check(volume, meta, where)
        start, size = self._crop_box(tensor.shape, spacing, size, gen)
        return apply_windows(resample_box(tensor, spacing, self.target, start, size, self.air_hu), self.windows)

    def slab(self, volume: np.ndarray, meta: dict, gen: torch.Generator, where: str) -> torch.Tensor:
        """2.5D: ``slices`` adjacent axial slices at the target spacing around a random level, the whole
        plane -> ``[windows x slices, H', W']`` in [0, 1] (window-major channels); the middle level when
        ``gen`` is None (evaluation)."""
        tensor, spacing = self.check(volume, meta, where)
        start, size = self._slab_box(tensor.shape, spacing, gen)
        windows = apply_windows(resample_box(tensor, spacing, self.target, start, size, self.air_hu), self.windows)
        return windows.reshape(-1, size[1], size[2])

    def labels(self, labels: np.ndarray, meta: dict, size: Optional[Sequence[int]], where: str) -> torch.Tensor:
        """The class ids of the evaluation view of the scan they lie on (nearest, background outside): int64
        ``[d, h, w]`` of the centred ``size`` crop, or (``size`` None: the 2.5D slab) ``[H', W']`` of the
        middle slice of the middle-level slab."""
        _, spacing = self.check(labels, meta, where)
        box = self._crop_box(labels.shape, spacing, size, None) if size else self._slab_box(labels.shape, spacing, None)
        ids = resample_box(labels, spacing, self.target, *box, air_hu=0.0, mode="nearest").round().to(torch.int64)
        return ids if size else ids[self.slices // 2]

    def _crop_box(self, shape, spacing, size, gen) -> tuple:
        """(start, size) of a ``size`` crop of the resampled grid: drawn from ``gen``, centred without it."""
        extent = resampled_shape(shape, spacing, self.target)
        return [crop_start(e, s, gen, random=gen is not None) for e, s in zip(extent, size)], tuple(size)

    def _slab_box(self, shape, spacing, gen) -> tuple:
        """(start, size) of a slab of ``slices`` whole planes of the resampled grid (the middle without ``gen``)."""
        extent = resampled_shape(shape, spacing, self.target)
        return (crop_start(extent[0], self.slices, gen, random=gen is not None), 0, 0), (self.slices, *extent[1:])
