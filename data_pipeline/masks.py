"""Segmentation masks beside 2D images (``pretrain shards xray|tiles SRC OUT --masks DIR``), for the dense probe;
those beside CT volumes (``pretrain shards ct ... --masks DIR``, ``seg.npy``) are read in :mod:`data_pipeline.ct_io`.

A source ``SRC/a/b.dcm`` takes its mask from ``DIR/a/b.png``: a single-channel PNG (8-bit gray or palette) of
class ids, 0..255, the size of the source image (or of the stored image, where ``--max-side`` shrank it). The
mask is stored beside the image as ``seg.png``, resized (nearest) to the stored image where they differ. At
evaluation the mask follows the image's deterministic view (the whole image resized to S x S, nearest for the
mask), and :func:`patch_labels` gives each patch the class most of its pixels hold.
"""
from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from PIL import Image

from data_pipeline.errors import BadInputError

if TYPE_CHECKING:  # torch is imported where masks are evaluated: conversion workers import no torch
    import torch

MASK_FIELD = "seg.png"
"""The field of a 2D sample that holds its mask."""
VOLUME_MASK_FIELD = "seg.npy"
"""The field of a CT sample that holds its label volume (uint8 class ids ``[z, y, x]``, the stored volume's grid)."""
MASK_FIELDS = (MASK_FIELD, VOLUME_MASK_FIELD)


def mask_path(masks: str, rel_path: str) -> str:
    """Where the mask of the source at ``rel_path`` is: ``masks/<rel_path without its extension>.png``."""
    return os.path.join(masks, os.path.splitext(rel_path)[0] + ".png")


def read_mask(path: str) -> np.ndarray:
    """The class ids ``uint8 [H, W]`` of a mask PNG.

    Raises:
        BadInputError: naming the file when it is missing, unreadable or not single-channel.
    """
    if not os.path.isfile(path):
        raise BadInputError(path, "mask file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise BadInputError(path, f"a mask must be an 8-bit gray or palette PNG of class ids, not {img.mode}")
            return np.asarray(img, dtype=np.uint8)
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise BadInputError(path, f"not a readable mask image: {exc}") from None


def stored_size(sample: dict, where: str) -> tuple:
    """(height, width) of the image a made sample stores, from its metadata."""
    meta = json.loads(sample["json"])
    if "height" not in meta or "width" not in meta:
        raise BadInputError(where, "sample metadata gives no image size to check its mask against")
    return int(meta["height"]), int(meta["width"])


def fit_mask(mask: np.ndarray, sample: dict, path: str) -> np.ndarray:
    """``mask`` at the stored image's size: as it is, or resized (nearest) from the source image's size.

    Raises:
        BadInputError: naming the mask when its size is neither the source's nor the stored image's.
    """
    height, width = stored_size(sample, path)
    if mask.shape == (height, width):
        return mask
    source = tuple(json.loads(sample["json"]).get("resized_from") or ())
    if mask.shape != source:
        raise BadInputError(path, f"mask is {mask.shape[0]} x {mask.shape[1]}, the image {height} x {width}")
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))


def attach_masks(make_sample: Callable[[object, str], dict], masks: Optional[str], locate: Callable[[str, str], str],
                 load: Callable[[str, dict], bytes], field: str) -> Callable[[object, str], dict]:
    """``make_sample(item, rel)`` adding ``field`` = ``load(path, sample)``, ``path`` = ``locate(masks, rel)`` (a
    source whose mask cannot be loaded is skipped, the reason naming the mask); ``make_sample`` itself without
    ``masks``."""
    if not masks:
        return make_sample

    def with_mask(item, rel_path: str) -> dict:
        path = locate(masks, rel_path)
        sample = make_sample(item, rel_path)
        try:
            data = load(path, sample)
        except BadInputError as exc:  # the manifest lists the source; the reason names its mask
            raise BadInputError(rel_path, f"mask {exc}") from None
        return dict(sample, **{field: data})

    return with_mask


def _png_mask(path: str, sample: dict) -> bytes:
    """The ``seg.png`` bytes of the mask at ``path`` for a made sample (:func:`fit_mask`)."""
    buffer = io.BytesIO()
    Image.fromarray(fit_mask(read_mask(path), sample, path)).save(buffer, format="PNG")
    return buffer.getvalue()


def with_masks(make_sample: Callable[[object, str], dict], masks: Optional[str]) -> Callable[[object, str], dict]:
    """``make_sample(item, rel)`` adding the ``seg.png`` field from the mask folder ``masks`` (a source without a
    readable mask of its size is skipped, naming the mask)."""
    return attach_masks(make_sample, masks, mask_path, _png_mask, MASK_FIELD)


def evaluation_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A decoded mask [H, W] -> int64 [size, size], resized as the evaluation view resizes its image (nearest)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.array(mask, dtype=np.int64))[None, None].float()
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0].to(torch.int64)


def patch_labels(masks: torch.Tensor, patch, classes: int) -> torch.Tensor:
    """[N, S, S] class ids -> [N, S/p, S/p] (``patch`` = p), or [N, D, S, S] -> [N, D/t, S/p, S/p] (``patch`` =
    (t, p, p), a tubelet): the class most pixels (voxels) of each patch hold (the lowest on a tie)."""
    import torch.nn.functional as F

    onehot = F.one_hot(masks, classes).movedim(-1, 1).float()
    pool = F.avg_pool3d if masks.ndim == 4 else F.avg_pool2d
    return pool(onehot, patch).argmax(dim=1)
