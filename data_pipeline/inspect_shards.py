"""``pretrain shards inspect URL``: what is in a set of shards, and a contact sheet of what the model will see.

Reads the shards (local or remote, through the stream's own tar stage, whose errors it lists
rather than counts or raises), recognises each sample's modality from
its fields (``npy`` volume: ct; ``mp4``: video; image with a slide id or colour: pathology;
other images: xray), and summarises per modality: sample count, shapes, bytes and decode time per
sample, CT voxel spacing, pathology microns per pixel, video frame rate and length, and samples that do not decode.
The contact sheet shows random samples (seeded): X-rays and tiles as they are, CT volumes as
their windowed middle axial slice, videos as a strip of four frames.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw
from data_pipeline.decoders import IMAGE_FIELDS, decode_sample, image_of
from data_pipeline.shards import resolve_shards
from data_pipeline.stream import Report, StreamError, compose, tar_samples, where_of
from data_pipeline.video_io import decode_frames

TILE = 128
SHEET_WINDOW = (40.0, 400.0)
"""HU window of CT tiles on the contact sheet (soft tissue)."""
IMAGE_DTYPES = (np.uint8, np.uint16)
TIMED_FRAMES = 16
"""A video sample's decode time is that of its first this many frames (a training clip's worth)."""


def modality_of(sample: dict) -> str:
    """The modality a decoded sample's fields say (an ``npy`` field is a CT volume when its metadata has a
    ``spacing`` or it is a 3D array of neither image dtype; else a 2D image stored raw)."""
    meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
    volume = sample.get("npy")
    if volume is not None and ("spacing" in meta or (volume.ndim == 3 and volume.dtype not in IMAGE_DTYPES)):
        return "ct"
    if "mp4" in sample:
        return "video"
    image = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
    if "slide_id" in meta or (image is not None and image.ndim == 3):
        return "pathology"
    return "xray"


def describe(sample: dict, modality: str) -> dict:
    """Shape and the modality's physical metadata of one decoded sample."""
    meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
    if modality == "ct":
        return {"shape": list(sample["npy"].shape), "spacing": meta.get("spacing")}
    if modality == "video":
        return {"shape": [meta.get("frames"), meta.get("height"), meta.get("width")], "fps": meta.get("fps")}
    image = image_of(sample, "")
    return {"shape": list(image.shape), "mpp": meta.get("mpp")}


def timed_decode(raw: dict, where: str) -> tuple:
    """(decoded sample, seconds its decode took): every field by its extension, and for a video its first
    :data:`TIMED_FRAMES` frames (the loader decodes frames, not the container)."""
    start = time.perf_counter()
    sample = decode_sample(raw)
    if "mp4" in sample:
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        decode_frames(sample["mp4"], list(range(min(TIMED_FRAMES, int(meta.get("frames") or 1)))), where)
    return sample, time.perf_counter() - start


def stored_bytes(raw: dict) -> int:
    """The bytes of a raw sample's fields (what its shard holds for it, tar headers left out)."""
    return sum(len(value) for key, value in raw.items() if not key.startswith("__"))


def thumbnail(sample: dict, modality: str) -> Image.Image:
    """A TILE x TILE RGB picture of one decoded sample."""
    if modality == "ct":
        volume = sample["npy"].astype(np.float32)
        centre, width = SHEET_WINDOW
        middle = np.clip((volume[volume.shape[0] // 2] - centre + width / 2) / width, 0, 1)
        picture = Image.fromarray((middle * 255).astype(np.uint8)).convert("RGB")
    elif modality == "video":
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        total = int(meta.get("frames") or 4)
        frames = decode_frames(sample["mp4"], [int(i) for i in np.linspace(0, total - 1, 4)], "inspect")
        strip = Image.new("RGB", (TILE, TILE))
        for index, frame in enumerate(frames):  # a 2 x 2 strip of frames, in time order
            strip.paste(Image.fromarray(frame).resize((TILE // 2, TILE // 2)), ((index % 2) * TILE // 2,
                                                                               (index // 2) * TILE // 2))
        return strip
    else:
        image = image_of(sample, "")
        if image.dtype == np.uint16:
            image = (image / 257).astype(np.uint8)
        picture = Image.fromarray(image).convert("RGB")
    scale = TILE / max(picture.width, picture.height)  # small images are enlarged, large ones reduced
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.NEAREST if scale > 1 else Image.BILINEAR)
    tile = Image.new("RGB", (TILE, TILE))
    tile.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
    return tile


def _summary(values: List) -> Optional[dict]:
    """min / median / max per component (of the values with the most common length, for shapes)."""
    values = [v for v in values if v is not None]
    lengths = [len(v) if isinstance(v, (list, tuple)) else 0 for v in values]
    if values:
        common = max(set(lengths), key=lengths.count)
        values = [v for v, n in zip(values, lengths) if n == common]
    numbers = np.array(values, dtype=np.float64)
    if numbers.size == 0:
        return None
    return {"min": numbers.min(axis=0).round(4).tolist(), "median": np.median(numbers, axis=0).round(4).tolist(),
            "max": numbers.max(axis=0).round(4).tolist()}


def listed(event: StreamError) -> dict:
    """The report's entry for one error of the stream's stages (the handler inspection passes them)."""
    reason = f"unreadable shard: {event.error}" if event.kind == "shard" else str(event.error)
    return {"sample": event.where, "reason": reason}


def inspect_shards(spec: str, sheet: Optional[str] = None, samples: int = 16, seed: int = 0,
                   max_samples: int = 0) -> Dict:
    """Summarise the shards of ``spec`` and optionally write a contact sheet PNG of ``samples`` random samples.

    Args:
        spec: shard URL(s) or a folder / URL with manifest.json (as ``data.shards``).
        sheet: PNG path for the contact sheet (None: no sheet).
        samples: tiles on the sheet.
        seed: seed of the random choice of tiles.
        max_samples: stop after this many samples (0: read every shard).

    Returns:
        ``{"shards", "samples", "undecodable": [{"sample", "reason"}], "modalities": {name: {"count",
        "shape", "bytes_per_sample", "decode_ms_per_sample", "spacing" | "mpp" | "fps"}}}`` (each summary
        min / median / max; decode as :func:`timed_decode`).
    """
    shards = resolve_shards(spec)
    rng = random.Random(seed)
    chosen, seen, undecodable = [], 0, []
    details = defaultdict(lambda: defaultdict(list))
    report = Report(lambda event: undecodable.append(listed(event)), cursor=None)  # inspection lists every error
    for raw in compose(shards.urls, tar_samples(report)):
        where = where_of(raw)
        try:
            sample, seconds = timed_decode(raw, where)
            modality = modality_of(sample)
            info = describe(sample, modality)
        except Exception as exc:
            report("sample", where, exc)
            continue
        info.update(bytes=stored_bytes(raw), decode_ms=round(seconds * 1000, 3))
        for key, value in info.items():
            details[modality][key].append(value)
        seen += 1
        if len(chosen) < samples:  # reservoir sampling keeps a uniform choice of tiles
            chosen.append((where, modality, sample))
        elif rng.random() < samples / seen:
            chosen[rng.randrange(samples)] = (where, modality, sample)
        if max_samples and seen >= max_samples:
            break
    report = {"shards": len(shards.urls), "samples": seen, "undecodable": undecodable, "modalities": {},
              "conversions": shards.conversions}
    for modality, fields in sorted(details.items()):
        entry = {"count": len(fields["shape"]), "shape": _summary(fields["shape"]),
                 "bytes_per_sample": _summary(fields["bytes"]), "decode_ms_per_sample": _summary(fields["decode_ms"])}
        for key in ("spacing", "mpp", "fps"):
            if any(v is not None for v in fields.get(key, [])):
                entry[key] = _summary(fields[key])
        report["modalities"][modality] = entry
    if sheet:
        write_sheet(chosen, sheet, undecodable)
    return report


def write_sheet(chosen: list, path: str, undecodable: list) -> None:
    """The contact sheet: tiles in rows of 4, each labelled with its modality and key."""
    columns = 4
    rows = max(1, -(-len(chosen) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (where, modality, sample) in enumerate(chosen):
        x, y = (index % columns) * TILE, (index // columns) * (TILE + 14)
        try:
            sheet.paste(thumbnail(sample, modality), (x, y))
        except Exception as exc:  # a sample that decodes but cannot be drawn (a video frame error)
            undecodable.append({"sample": where, "reason": f"cannot draw: {exc}"})
        draw.text((x + 2, y + TILE), f"{modality} {where.rsplit(':', 1)[-1][:16]}", fill="black")
    sheet.save(path)


def format_report(report: dict) -> str:
    """The report as lines for a terminal."""
    lines = [f"{report['samples']} samples in {report['shards']} shard(s)"]
    for conversion in report.get("conversions", []):
        options = ", ".join(f"{name} {value}" for name, value in conversion.get("options", {}).items()
                            if value is not None)
        lines.append(f"  converted as {conversion.get('kind')}" + (f" with {options}" if options else ""))
    for modality, entry in report["modalities"].items():
        line = f"  {modality}: {entry['count']} samples, shape median {entry['shape']['median']}"
        line += f" (min {entry['shape']['min']}, max {entry['shape']['max']})"
        line += (f"; {entry['bytes_per_sample']['median']:.0f} bytes and {entry['decode_ms_per_sample']['median']}"
                 " ms decode per sample (median)")
        for key, unit in (("spacing", "mm [z, y, x]"), ("mpp", "um/px"), ("fps", "fps")):
            if key in entry:
                line += f"; {key} median {entry[key]['median']} {unit}"
        lines.append(line)
    if report["undecodable"]:
        lines.append(f"  {len(report['undecodable'])} undecodable sample(s), e.g. {report['undecodable'][0]}")
    return "\n".join(lines)
