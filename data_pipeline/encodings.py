"""How converted 2D images are stored (``pretrain shards ... --encoding``) and pre-resized (``--max-side``).

The encoding trades shard bytes against decode time in the loader:

- ``png``: lossless; 16-bit grayscale X-rays stay 16-bit. The default for X-rays.
- ``npy``: the raw array (``uint16 [H, W]`` X-rays, ``uint8 [H, W, 3]`` tiles): the most bytes, and no decode
  at all (the loader views the shard's bytes).
- ``jpeg``: lossy at ``quality``, 8-bit only (16-bit X-rays are rounded to 8 bits first); the fewest bytes.
  The default for tiles cut from slides.

The field a sample's image goes into is named by its encoding (``png``, ``npy``, ``jpg``), so the loader's
decoders (:mod:`data_pipeline.decoders`) read any of them. :func:`fit_longer_side` pre-resizes with the
resampling training's crops use (bilinear with antialiasing, torchvision on float pixels in [0, 1]) and
gives the image back in its own dtype, so a pre-resized X-ray is still 16-bit.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image

ENCODINGS = ("png", "npy", "jpeg")
FIELDS = {"png": "png", "npy": "npy", "jpeg": "jpg"}
"""The sample field each encoding writes."""
_SCALE = {np.dtype(np.uint16): 65535.0, np.dtype(np.uint8): 255.0}


def check_encoding(encoding: str, where: str = "--encoding") -> str:
    """``encoding`` when it is one of :data:`ENCODINGS`.

    Raises:
        ValueError: naming ``where`` and the encodings there are.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"{where}: unknown encoding {encoding!r} (one of {', '.join(ENCODINGS)})")
    return encoding


def encode_image(pixels: np.ndarray, encoding: str, quality: int = 90) -> Tuple[str, bytes]:
    """(field, bytes) of a ``uint8`` or ``uint16`` image (``[H, W]`` or ``[H, W, 3]``) in ``encoding``.

    The bytes depend only on the pixels and the arguments (no timestamps), so a conversion is repeatable.
    """
    check_encoding(encoding)
    if pixels.dtype not in _SCALE or pixels.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 / uint16 [H, W] or [H, W, 3] image, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    if encoding == "npy":
        np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    elif encoding == "png":
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        if pixels.dtype == np.uint16:
            pixels = np.round(pixels / 257.0).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return FIELDS[encoding], buffer.getvalue()


def fit_longer_side(pixels: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    """``pixels`` (``[H, W]`` or ``[H, W, C]``, uint8 / uint16) resized so that the longer side is ``max_side``
    (aspect kept, each side rounded, at least 1), with training's resampling; unchanged when already within
    ``max_side`` or when it is None."""
    height, width = pixels.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return pixels
    import torch  # here, not at the top: conversion workers that do not resize start without torch
    import torchvision.transforms.functional as TF

    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    scale = max_side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    unit = _SCALE[pixels.dtype]
    values = torch.from_numpy(pixels.astype(np.float32) / unit)
    values = values[None] if pixels.ndim == 2 else values.permute(2, 0, 1)
    resized = TF.resize(values, size, antialias=True).clamp(0.0, 1.0)
    resized = resized[0] if pixels.ndim == 2 else resized.permute(1, 2, 0)
    return np.round(resized.numpy() * unit).astype(pixels.dtype)
