"""The X-ray and pre-cut tile shard kinds, and what every kind shares: source listing, keys, labels.

A kind (see :data:`data_pipeline.writers.KINDS`) lists its sources under a folder and turns each
into samples with ``make_samples(item, rel) -> [(key, {ext: bytes})]``; :mod:`data_pipeline.conversion`
writes them as shards ``<modality>-%06d.tar`` with a manifest, skipping (and listing) sources that
raise :class:`BadInputError`. ``ct_io``, ``wsi_io`` and ``video_io`` hold the other kinds.

X-ray samples hold the image (``png``: lossless 16-bit grayscale by default; ``npy`` or ``jpg`` with
``encoding``, see :mod:`data_pipeline.encodings`), pre-resized to ``max_side`` where given, and ``json`` (the
metadata of :func:`data_pipeline.xray_io.read_xray`, ``source`` relative to src).

Pathology tiles already cut from slides keep their JPEG/PNG bytes, or are re-encoded with ``encoding``.

Command line: ``pretrain shards xray|tiles|ct|wsi|video SRC OUT --samples-per-shard N``.
"""

import csv
import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from typing import Optional

from PIL import Image

from data_pipeline.decoders import decode_image
from data_pipeline.encodings import check_encoding, encode_image, fit_longer_side
from data_pipeline.errors import BadInputError
from data_pipeline.masks import with_masks
from data_pipeline.xray_io import read_xray

_KEY_STEM_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(rel_path: str) -> str:
    """A WebDataset key without dots for the file at ``rel_path`` (relative to the source root).

    The sanitised file stem (at most 64 characters) keeps keys readable; the
    first 10 hex characters of the SHA-1 of the relative path make them unique.
    """
    posix_rel = rel_path.replace(os.sep, "/")
    stem = os.path.splitext(os.path.basename(posix_rel))[0]
    stem = _KEY_STEM_CHARS.sub("_", stem).strip("_")[:64] or "sample"
    return f"{stem}_{hashlib.sha1(posix_rel.encode('utf-8')).hexdigest()[:10]}"


def list_source_files(src: str, accept: Callable[[str], bool]) -> list[str]:
    """Every file under ``src`` (recursively, sorted, so deterministic) for which ``accept(path)`` is true."""
    found = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files) if accept(os.path.join(root, name)))
    return found


def source_items(src: str, accept: Callable[[str], bool]) -> list:
    """``[(path relative to src, path)]`` of every accepted file under ``src`` (see :func:`list_source_files`).

    Raises:
        BadInputError: naming ``src`` when it is not a folder.
    """
    if not os.path.isdir(src):
        raise BadInputError(src, "source folder does not exist or is not a folder")
    return [(os.path.relpath(path, src).replace(os.sep, "/"), path) for path in list_source_files(src, accept)]


def one_sample(make_sample: Callable[[str, str], dict]) -> Callable[[str, str], list]:
    """Adapt ``make_sample(path, rel) -> {ext: bytes}`` (one sample per file) to ``make_samples``."""
    return lambda path, rel: [(sample_key(rel), make_sample(path, rel))]


def xray_samples(labels: Optional[str] = None, max_side: Optional[int] = None, encoding: str = "png",
                 quality: int = 90, masks: Optional[str] = None) -> Callable:
    """``make_samples`` of the ``xray`` kind (one sample per file, ``cls`` from ``labels``, ``seg.png`` from the
    mask folder ``masks``): the image resized to ``max_side`` (when larger) and stored in ``encoding``
    (``quality``: JPEG's)."""
    check_encoding(encoding)
    make = functools.partial(_xray_sample, max_side=max_side, encoding=encoding, quality=quality)
    return one_sample(with_masks(labelled(make, labels), masks))


TILE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TILE_COORDS = re.compile(r"x[_-]?(\d+)[_-]+y[_-]?(\d+)", re.IGNORECASE)


def is_tile_file(path: str) -> bool:
    """A JPEG or PNG tile (by extension)."""
    return path.lower().endswith(TILE_EXTENSIONS)


def read_tile(path: str, rel_path: str) -> dict:
    """``{"jpg"|"png": the file's bytes, "json": metadata}`` for one pre-cut pathology tile.

    The bytes are stored as they are (no re-encoding); the metadata holds the slide id (the
    tile's folder), the tile size, and the x/y coordinates when the file name carries them
    (``..._x1024_y2048.jpg``).

    Raises:
        BadInputError: unreadable, empty, not RGB-convertible, or with absurd declared dimensions
            (PIL's decompression-bomb guard).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.convert("RGB").load()
    except Image.DecompressionBombError as exc:
        raise BadInputError(path, f"refused: {exc}") from None
    except Exception as exc:
        raise BadInputError(path, f"not a readable image: {exc}") from None
    if width == 0 or height == 0:
        raise BadInputError(path, "zero-size image")
    metadata = {"source": rel_path, "slide_id": os.path.dirname(rel_path) or "unknown", "width": width,
                "height": height}
    if match := _TILE_COORDS.search(os.path.basename(rel_path)):
        metadata.update(x=int(match.group(1)), y=int(match.group(2)))
    extension = "png" if path.lower().endswith(".png") else "jpg"
    return {extension: data, "json": json.dumps(metadata, sort_keys=True).encode("utf-8")}


def tile_samples(labels: Optional[str] = None, encoding: Optional[str] = None, quality: int = 90,
                 masks: Optional[str] = None) -> Callable:
    """``make_samples`` of the ``tiles`` kind (one sample per tile file, ``cls`` from ``labels``, ``seg.png`` from
    the mask folder ``masks``): the tile's bytes as they are, or re-encoded in ``encoding``."""
    if encoding is None:
        return one_sample(with_masks(labelled(read_tile, labels), masks))
    check_encoding(encoding)
    make = functools.partial(_encoded_tile, encoding=encoding, quality=quality)
    return one_sample(with_masks(labelled(make, labels), masks))


def _encoded_tile(path: str, rel_path: str, encoding: str, quality: int) -> dict:
    """:func:`read_tile`'s sample with the image re-encoded in ``encoding``."""
    sample = read_tile(path, rel_path)
    data = sample.pop("png" if "png" in sample else "jpg")
    field, encoded = encode_image(decode_image(data), encoding, quality)
    return {field: encoded, **sample}


def labelled(make_sample: Callable[[object, str], dict], labels: Optional[str]) -> Callable[[object, str], dict]:
    """``make_sample(item, rel)`` adding the integer ``cls`` field from a labels CSV of ``rel,label`` rows
    (sources without a row are skipped)."""
    if not labels:
        return make_sample
    label_of = read_labels(labels)

    def with_label(item, rel_path: str) -> dict:
        if rel_path not in label_of:
            raise BadInputError(rel_path, f"no label for {rel_path} in {labels}")
        return dict(make_sample(item, rel_path), cls=str(label_of[rel_path]).encode("utf-8"))

    return with_label


def read_labels(path: str) -> dict:
    """``{relative path: int label}`` from a CSV of ``path,label`` rows (a header row is allowed).

    Raises:
        BadInputError: naming the CSV and line for a missing file or a row that is not ``path,integer``.
    """
    if not os.path.isfile(path):
        raise BadInputError(path, "label file not found")
    labels = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and row[-1].strip().lower() == "label"):
                continue
            if len(row) != 2 or not row[1].strip().lstrip("-").isdigit():
                raise BadInputError(f"{path}:{line}", f"expected 'path,integer label', got {row}")
            labels[row[0].strip().replace(os.sep, "/")] = int(row[1])
    return labels


def _xray_sample(path: str, rel_path: str, max_side: Optional[int] = None, encoding: str = "png",
                 quality: int = 90) -> dict:
    """``{image field: bytes, "json": bytes}`` for one X-ray file, ``source`` set to ``rel_path``; a resized image's
    metadata has its new ``height`` / ``width``, its ``pixel_spacing`` scaled and ``resized_from`` [H, W]."""
    image, metadata = read_xray(path)
    metadata["source"] = rel_path
    resized = fit_longer_side(image, max_side)
    if resized is not image:
        metadata["resized_from"] = [metadata["height"], metadata["width"]]
        metadata["height"], metadata["width"] = (int(side) for side in resized.shape)
        if metadata.get("pixel_spacing"):
            rows, columns = metadata["pixel_spacing"]
            metadata["pixel_spacing"] = [rows * image.shape[0] / resized.shape[0],
                                         columns * image.shape[1] / resized.shape[1]]
    field, data = encode_image(resized, encoding, quality)
    return {field: data, "json": json.dumps(metadata, sort_keys=True).encode("utf-8")}
