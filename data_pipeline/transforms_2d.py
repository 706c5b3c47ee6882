"""2D transforms for single-view objectives, driven by an explicit random generator.

Every random choice draws from a ``torch.Generator`` seeded per sample, so a sample's
augmentation depends only on (run seed, pass, key): replaying a stream after a
resume reproduces it exactly.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from data_pipeline.errors import BadInputError


def to_unit_tensor(pixels: np.ndarray, where: str) -> torch.Tensor:
    """Grayscale or RGB pixels to a float tensor [C, H, W] in [0, 1].

    uint16 is divided by 65535, uint8 by 255; floats are taken as they are.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3:
        raise BadInputError(where, f"expected a 2D image, got an array of shape {pixels.shape}")
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise BadInputError(where, "image has non-finite pixel values")  # integer pixels cannot be
    scale = {np.dtype(np.uint16): 65535.0, np.dtype(np.uint8): 255.0}.get(pixels.dtype, 1.0)
    return torch.from_numpy(pixels.astype(np.float32) / scale).permute(2, 0, 1).contiguous()


def normalised(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(values - mean) / std, into ``out`` where given (a view's own tensor, e.g. one crop of DINOv2's
    stacked crops), else into a new tensor.

    Raises:
        ValueError: ``out`` has another shape than ``values``.
    """
    if out is None:
        return (values - mean) / std
    if out.shape != values.shape:
        raise ValueError(f"normalising {tuple(values.shape)} values into a {tuple(out.shape)} tensor")
    return torch.sub(values, mean, out=out).div_(std)


def random_resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                            gen: torch.Generator, tries: int = 10) -> tuple:
    """(top, left, crop_h, crop_w) covering a random area fraction in ``scale`` with an aspect
    ratio (w/h) drawn log-uniformly from ``ratio``; falls back to the largest centred crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(u[2] * (height - crop_h + 1))
            left = int(u[3] * (width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class Crop(NamedTuple):
    """The drawn choices of one random resized crop: box, output side, flips, quarter turns (None: off)."""

    box: tuple
    """(top, left, crop_h, crop_w) in the source image."""
    size: int
    hflip: bool
    vflip: bool
    turns: Optional[int]


def apply_crop(image: torch.Tensor, crop: Crop) -> torch.Tensor:
    """``image`` ``[..., H, W]`` (on any device) cropped, resized to ``crop.size``, flipped and turned as drawn."""
    view = TF.resized_crop(image, *crop.box, [crop.size, crop.size], antialias=True)
    if crop.hflip:
        view = TF.horizontal_flip(view)
    if crop.vflip:
        view = TF.vertical_flip(view)
    if crop.turns is not None:
        view = torch.rot90(view, crop.turns, dims=(-2, -1))
    return view


class _Normalised:
    """Channel matching and per-channel normalisation shared by the 2D views."""

    def __init__(self, size: int, in_chans: int, cfg):
        self.size = size
        self.in_chans = in_chans
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
        self._on_device: dict = {}  # device -> (mean, std) there, for views applied on the training device

    def match_channels(self, image: torch.Tensor, where: str) -> torch.Tensor:
        """[C, H, W] -> [in_chans, H, W]; a grayscale image is repeated."""
        if image.shape[0] == self.in_chans:
            return image
        if image.shape[0] != 1:
            raise BadInputError(where, f"{image.shape[0]}-channel image for a {self.in_chans}-channel model")
        return image.expand(self.in_chans, -1, -1)

    def normalise(self, view: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(view - mean) / std per channel, on the view's device; written into ``out`` (of the same shape) where
        given, else into a new tensor."""
        if view.device == self.mean.device:
            return normalised(view, self.mean, self.std, out)
        key = str(view.device)
        if key not in self._on_device:
            self._on_device[key] = (self.mean.to(view.device), self.std.to(view.device))
        return normalised(view, *self._on_device[key], out)

    def evaluate(self, image: torch.Tensor, where: str) -> torch.Tensor:
        """The deterministic view for evaluation and export contracts: the whole image ``[C, H, W]`` in
        [0, 1] resized to size x size, channels matched, normalised."""
        view = TF.resize(self.match_channels(image, where), [self.size, self.size], antialias=True)
        return self.normalise(view)


class SingleView(_Normalised):
    """One augmented, normalised view: random resized crop, optional flip, channel match, normalise.

    Args:
        size: output side in pixels.
        in_chans: channels the model expects (a grayscale image is repeated to fill them).
        cfg: :class:`pretrain.config.TransformConfig`-like (crop_scale, crop_ratio, hflip, vflip, rotate90,
            mean, std).
    """

    def __init__(self, size: int, in_chans: int, cfg):
        super().__init__(size, in_chans, cfg)
        self.scale = tuple(cfg.crop_scale)
        self.ratio = tuple(cfg.crop_ratio)
        self.hflip = cfg.hflip
        self.vflip = cfg.vflip
        self.rotate90 = cfg.rotate90

    def draw_crop(self, height: int, width: int, size: int, scale, gen: torch.Generator) -> Crop:
        """The random choices of :meth:`crop` for an image of ``height`` x ``width``, drawn in its order."""
        box = random_resized_crop_box(height, width, scale, self.ratio, gen)
        hflip = bool(self.hflip and torch.rand(1, generator=gen).item() < 0.5)
        vflip = bool(self.vflip and torch.rand(1, generator=gen).item() < 0.5)
        turns = int(torch.randint(0, 4, (1,), generator=gen).item()) if self.rotate90 else None
        return Crop(box, size, hflip, vflip, turns)

    def crop(self, image: torch.Tensor, size: int, scale, gen: torch.Generator) -> torch.Tensor:
        """A random resized crop of ``image`` ``[..., H, W]`` to size x size (area in ``scale``), randomly
        flipped and turned by a multiple of 90 degrees where enabled; leading dimensions (channels,
        frames) share the crop."""
        return apply_crop(image, self.draw_crop(image.shape[-2], image.shape[-1], size, scale, gen))

    def draw(self, shape: Sequence[int], gen: torch.Generator) -> dict:
        """The random choices of this view for an image of ``shape`` ``[C, H, W]``: {'image': Crop}."""
        return {"image": self.draw_crop(shape[-2], shape[-1], self.size, self.scale, gen)}

    def apply(self, image: torch.Tensor, choices: dict) -> dict:
        """The view of ``image`` (channels matched, on any device) for choices from :meth:`draw`."""
        return {"image": self.normalise(apply_crop(image, choices["image"]))}

    def __call__(self, image: torch.Tensor, gen: torch.Generator, where: str) -> dict:
        """image: [C, H, W] in [0, 1] -> {'image': [in_chans, size, size] normalised}."""
        image = self.match_channels(image, where)
        return self.apply(image, self.draw(image.shape, gen))
