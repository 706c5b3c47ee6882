"""Whole-slide images -> tissue tiles at a requested resolution (microns per pixel).

Slides open with OpenSlide (openslide-python + the openslide-bin wheel: SVS, NDPI, MRXS...)
when it is installed, else with tiffslide (pure Python, TIFF-based formats). The tissue
detector is deliberately simple and documented:

1. a thumbnail at about 8 thumbnail pixels per tile side is converted to saturation
   ``S = (max(R, G, B) - min(R, G, B)) / max(R, G, B)`` (glass and background are grey/white:
   low S; H&E-stained tissue is coloured: high S);
2. Otsu's threshold on S (floored at ``MIN_SATURATION`` so that an empty slide stays empty)
   gives the tissue mask;
3. a tile is kept when the mask covers at least ``min_tissue`` of it.

Kept tiles are read at the pyramid level closest above the requested resolution, resized to
``tile_size`` and stored as JPEG (or ``encoding``) with the slide id, level, level-0 coordinates and mpp.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from data_pipeline.encodings import check_encoding, encode_image
from data_pipeline.errors import BadInputError
from data_pipeline.write_shards import read_labels, sample_key

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MIN_SATURATION = 0.05
MPP_TOLERANCE = 1.1
"""A slide may be at most 10% coarser than the requested mpp."""


def is_slide_file(path: str) -> bool:
    """A whole-slide image, by extension."""
    return path.lower().endswith(SLIDE_EXTENSIONS)


def open_slide(path: str):
    """An OpenSlide-like object (``level_dimensions``, ``level_downsamples``, ``properties``, ``read_region``)."""
    try:
        import openslide
    except ImportError:
        openslide = None
    try:
        if openslide is not None:
            return openslide.OpenSlide(path)
        import tiffslide

        return tiffslide.TiffSlide(path)
    except Exception as exc:
        raise BadInputError(path, f"not a readable slide: {exc}") from None


def slide_mpp(slide, path: str, fallback: Optional[float]) -> float:
    """Microns per level-0 pixel from the slide's properties, else ``fallback``."""
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        value = slide.properties.get(key)
        if value not in (None, ""):
            mpp = float(value)
            if mpp > 0 and math.isfinite(mpp):
                return mpp
    if fallback:
        return float(fallback)
    raise BadInputError(path, "the slide does not say its microns per pixel; pass --source-mpp")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1e-12)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (saturation above its Otsu threshold)."""
    rgb = rgb.astype(np.float32) / 255.0
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    return saturation > max(otsu_threshold(saturation), MIN_SATURATION)


def _rgb(region: Image.Image) -> Image.Image:
    """An RGBA region composited on white (transparent = outside the scanned area) as RGB."""
    if region.mode == "RGBA":
        background = Image.new("RGB", region.size, (255, 255, 255))
        background.paste(region, mask=region.split()[3])
        return background
    return region.convert("RGB")


def slide_tiles(path: str, rel: str, mpp: float, tile_size: int, min_tissue: float,
                source_mpp: Optional[float] = None, encoding: str = "jpeg", quality: int = 90) -> Iterator[tuple]:
    """``(key, {image field, "json"})`` for every tissue tile of one slide, on a grid of ``tile_size`` at ``mpp``,
    each stored in ``encoding`` (:mod:`data_pipeline.encodings`; ``quality``: JPEG's).

    Raises:
        BadInputError: unreadable slide, unknown or too coarse resolution, no tissue tile.
    """
    slide = open_slide(path)
    try:
        base_mpp = slide_mpp(slide, path, source_mpp)
        if base_mpp > mpp * MPP_TOLERANCE:
            raise BadInputError(path, f"scanned at {base_mpp:.3f} um/px, coarser than the requested {mpp} um/px")
        width, height = slide.level_dimensions[0]
        span = tile_size * mpp / base_mpp  # level-0 pixels per tile side
        columns, rows = int(width // span), int(height // span)
        if columns == 0 or rows == 0:
            raise BadInputError(path, f"{width}x{height} px at {base_mpp} um/px is smaller than one tile")
        thumb_scale = min(8.0 / span, 4096.0 / max(width, height))
        thumb = _rgb(slide.get_thumbnail((max(1, round(width * thumb_scale)), max(1, round(height * thumb_scale)))))
        mask = tissue_mask(np.asarray(thumb))
        sy, sx = mask.shape[0] / height, mask.shape[1] / width
        level = slide.get_best_level_for_downsample(span / tile_size)
        downsample = float(slide.level_downsamples[level])
        read = max(1, round(span / downsample))
        tiles = []
        for row in range(rows):
            for column in range(columns):
                x, y = int(column * span), int(row * span)
                cell = mask[int(y * sy):max(int(y * sy) + 1, int((y + span) * sy)),
                            int(x * sx):max(int(x * sx) + 1, int((x + span) * sx))]
                fraction = float(cell.mean()) if cell.size else 0.0
                if fraction < min_tissue:
                    continue
                tile = _rgb(slide.read_region((x, y), level, (read, read)))
                if tile.size != (tile_size, tile_size):
                    tile = tile.resize((tile_size, tile_size), Image.BILINEAR)
                field, data = encode_image(np.asarray(tile), encoding, quality)
                meta = {"source": rel, "slide_id": os.path.splitext(rel)[0], "x": x, "y": y, "level": level,
                        "mpp": mpp, "slide_mpp": base_mpp, "tile_size": tile_size, "tissue_fraction": fraction}
                tiles.append((sample_key(f"{os.path.splitext(rel)[0]}_x{x}_y{y}"), {field: data,
                                                             "json": json.dumps(meta, sort_keys=True).encode()}))
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(path, f"cannot read slide: {exc}") from None
    finally:
        slide.close()
    if not tiles:
        raise BadInputError(path, f"no tile with at least {min_tissue:.0%} tissue")
    return iter(tiles)


def wsi_samples(labels: Optional[str] = None, mpp: float = 0.5, tile_size: int = 224, min_tissue: float = 0.5,
                source_mpp: Optional[float] = None, encoding: str = "jpeg", quality: int = 90):
    """``make_samples`` of the ``wsi`` kind: the tissue tiles of one slide, each with the slide's ``cls``."""
    check_encoding(encoding)
    label_of = read_labels(labels) if labels else None

    def make_samples(path: str, rel: str):
        if label_of is not None and rel not in label_of:
            raise BadInputError(rel, f"no label for {rel} in {labels}")
        for key, sample in slide_tiles(path, rel, mpp, tile_size, min_tissue, source_mpp, encoding, quality):
            yield key, (dict(sample, cls=str(label_of[rel]).encode()) if label_of is not None else sample)

    return make_samples
