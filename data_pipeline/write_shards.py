"""Raw data → WebDataset tar shards + ``manifest.json``, one writer per modality.

The shared part (:func:`write_modality_shards`) takes the sources found under a
folder (files, DICOM series, slides), turns each into its samples with a
per-modality function, skips sources that raise :class:`BadInputError` (listing
them in the manifest), splits samples into shards named ``<modality>-%06d.tar``
and writes the manifest. A modality adds only the list of its sources and a
``make_samples(item, rel) -> [(key, {ext: bytes})]`` function;
:func:`write_xray_shards` is the X-ray one, ``ct_io``, ``wsi_io`` and
``video_io`` hold the others (all listed in :data:`data_pipeline.writers.WRITERS`).

X-ray samples hold ``png`` (lossless 16-bit grayscale) and ``json`` (the
metadata of :func:`data_pipeline.xray_io.read_xray`, ``source`` relative to src).

Pathology tiles already cut from slides (:func:`write_tile_shards`) keep their JPEG/PNG bytes.

Command line: ``pretrain shards xray|tiles|ct|wsi|video SRC OUT --samples-per-shard N``.
"""

import csv
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Optional

import numpy as np
import webdataset
from PIL import Image
from tqdm import tqdm

from data_pipeline.errors import BadInputError
from data_pipeline.shards import FORMAT_VERSION, MANIFEST_NAME
from data_pipeline.xray_io import is_xray_file, read_xray

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


def encode_png16(image: np.ndarray) -> bytes:
    """Lossless 16-bit grayscale PNG bytes of a ``uint16`` image ``[H, W]``."""
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"encode_png16 expects a uint16 [H, W] array, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


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


def write_modality_shards(
    modality: str,
    src: str,
    out: str,
    items: list,
    make_samples: Callable[[object, str], Iterable],
    samples_per_shard: int,
    progress: bool,
) -> dict:
    """Write the samples made from every source item as shards in ``out``, plus the manifest.

    Args:
        modality: name of the modality; also the shard prefix (``<out>/<modality>-000000.tar``).
        src: the source folder (recorded in the manifest).
        out: output folder (created). Shards with this prefix and the manifest
            from an earlier run there are removed first.
        items: ``[(rel name, item)]``: the sources in a deterministic order (a file path, a DICOM
            series, a slide), named relative to ``src``.
        make_samples: ``make_samples(item, rel) -> [(key, {extension: bytes})]``: the samples of
            one source (one for an X-ray, many tiles for a slide); raises BadInputError for a
            source to skip (none of its samples is written).
        samples_per_shard: samples per shard (the last one may hold fewer).
        progress: show a tqdm progress bar over sources.

    Returns:
        The manifest dict that was written to ``<out>/manifest.json``.

    Raises:
        BadInputError: naming ``src`` when no source gave a sample.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    os.makedirs(out, exist_ok=True)
    _remove_earlier_output(out, modality)
    pattern = os.path.join(out, f"{modality}-%06d.tar")
    samples_in_shard, skipped = _write_samples(pattern, modality, items, make_samples, samples_per_shard, progress)
    if not samples_in_shard:
        if os.path.exists(pattern % 0):
            os.remove(pattern % 0)
        raise BadInputError(src, f"no usable {modality} data found ({len(items)} candidates, {len(skipped)} skipped)")
    manifest = {
        "modality": modality,
        "format_version": FORMAT_VERSION,
        "shards": [{"name": name, "samples": count} for name, count in samples_in_shard.items()],
        "total_samples": sum(samples_in_shard.values()),
        "skipped": skipped,
        "source": src,
    }
    _write_json_atomically(os.path.join(out, MANIFEST_NAME), manifest)
    return manifest


def _write_samples(pattern: str, modality: str, items: list, make_samples: Callable, samples_per_shard: int,
                   progress: bool) -> tuple:
    """Write the samples of every item into shards named by ``pattern``: ({shard name: samples},
    [skipped items with their reasons])."""
    samples_in_shard: dict[str, int] = {}
    skipped = []
    shard_writer = webdataset.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, encoder=False, mtime=0)
    bar = tqdm(items, desc=f"{modality} shards", unit="source", disable=not progress)
    with shard_writer as writer, bar:
        for rel, item in bar:
            try:
                samples = list(make_samples(item, rel))
            except BadInputError as exc:
                skipped.append({"file": rel, "reason": exc.reason})
                tqdm.write(f"warning: skipped {rel}: {exc.reason}", file=sys.stderr)
                continue
            for key, sample in samples:
                writer.write({"__key__": key, **sample})
                shard_name = os.path.basename(writer.fname)
                samples_in_shard[shard_name] = samples_in_shard.get(shard_name, 0) + 1
            bar.set_postfix(written=writer.total, skipped=len(skipped), refresh=False)
    return samples_in_shard, skipped


def write_xray_shards(src: str, out: str, samples_per_shard: int = 256, progress: bool = True,
                      labels: Optional[str] = None) -> dict:
    """Shard every X-ray file (DICOM / PNG / JPEG / TIFF) under ``src`` into ``out``.

    Each sample is ``{"__key__": key, "png": 16-bit PNG bytes of the uint16
    [H, W] image, "json": UTF-8 metadata}``, plus ``"cls"`` (the integer label) when
    ``labels`` names a CSV of ``path,label`` rows (paths relative to ``src``; files
    without a row are skipped and listed). Unreadable files are skipped and listed.
    See :func:`write_modality_shards` for the other arguments and the manifest.
    """
    return write_modality_shards("xray", src, out, source_items(src, is_xray_file),
                                 one_sample(labelled(_xray_sample, labels)), samples_per_shard, progress)


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


def write_tile_shards(src: str, out: str, samples_per_shard: int = 256, progress: bool = True,
                      labels: Optional[str] = None) -> dict:
    """Shard a folder of pre-cut pathology tiles (JPEG / PNG, one sub-folder per slide) into ``out``.

    Samples are ``{"jpg" or "png": original bytes, "json": metadata}`` (see :func:`read_tile`),
    plus ``"cls"`` with ``labels``; shards are named ``pathology-%06d.tar``. See
    :func:`write_modality_shards` for the rest.
    """
    return write_modality_shards("pathology", src, out, source_items(src, is_tile_file),
                                 one_sample(labelled(read_tile, labels)), samples_per_shard, progress)


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


def _xray_sample(path: str, rel_path: str) -> dict:
    """``{"png": bytes, "json": bytes}`` for one X-ray file, ``source`` set to ``rel_path``."""
    image, metadata = read_xray(path)
    metadata["source"] = rel_path
    return {"png": encode_png16(image), "json": json.dumps(metadata, sort_keys=True).encode("utf-8")}


def _remove_earlier_output(out: str, modality: str) -> None:
    """Delete ``<modality>-NNNNNN.tar`` shards and the manifest left in ``out`` by an earlier run."""
    earlier_shard = re.compile(rf"{re.escape(modality)}-\d{{6}}\.tar")
    for name in os.listdir(out):
        if earlier_shard.fullmatch(name) or name == MANIFEST_NAME:
            os.remove(os.path.join(out, name))


def _write_json_atomically(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename."""
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(tmp_path, path)

