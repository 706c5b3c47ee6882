"""Video clips: probing and (optional) re-encoding for shards, frame sampling and decoding with PyAV.

Shards keep each clip as its container bytes (``mp4`` field, as it is or re-encoded to a
bounded resolution) beside ``json`` metadata (``fps``, ``frames``, ``duration``, ``width``,
``height``, ``codec``). At training time :func:`frame_indices` picks T frame numbers from the
sample's generator and :func:`decode_frames` decodes only up to the last of them, seeking to
the nearest key frame before the first.
"""
from __future__ import annotations

import functools
import io
import json
from fractions import Fraction
from typing import TYPE_CHECKING, List, Optional

import numpy as np

from data_pipeline.errors import BadInputError
from data_pipeline.write_shards import labelled, one_sample

if TYPE_CHECKING:
    import torch

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
MAX_PIXELS = 8192 * 8192
"""Frames declaring more pixels than this are refused (decompression-bomb guard)."""
X264_KERNELS = "MMX2,SSE,SSE2,SSE3,SSSE3,SSE4.1,SSE4.2,AVX,FMA3,AVX2,BMI1,BMI2,LZCNT,POPCNT"
"""The x86 kernel sets libx264 re-encodes with: its AVX-512 kernels give different bytes from run to run (measured
with libx264 core 165 on a Xeon with AVX-512, even on one thread), so they are left out wherever AVX2 is there."""
_AVX2_FLAGS = {"avx2", "fma", "bmi1", "bmi2", "abm", "popcnt", "sse4_2"}


def is_video_file(path: str) -> bool:
    """A video container, by extension."""
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _open(data: bytes, where: str):
    """(container, video stream) of clip bytes; refuses clips without video or with absurd frame sizes."""
    import av

    if not data:
        raise BadInputError(where, "empty video file")
    try:
        container = av.open(io.BytesIO(data))
    except Exception as exc:
        raise BadInputError(where, f"not a readable video: {exc}") from None
    if not container.streams.video:
        container.close()
        raise BadInputError(where, "no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > MAX_PIXELS:
        container.close()
        raise BadInputError(where, f"refused: declared frame size {width}x{height} exceeds {MAX_PIXELS} pixels")
    return container, stream


def probe_video(data: bytes, where: str) -> dict:
    """Metadata of a clip, decoding it all once (the count is checked, not trusted from the header).

    Raises:
        BadInputError: empty, unreadable or undecodable clips, clips without frames, absurd sizes.
    """
    container, stream = _open(data, where)
    with container:
        try:
            frames = 0
            for frame in container.decode(stream):
                frames += 1
                width, height = frame.width, frame.height
        except Exception as exc:
            raise BadInputError(where, f"cannot decode video: {exc}") from None
        if frames == 0:
            raise BadInputError(where, "no decodable frames")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            raise BadInputError(where, "unknown frame rate")
        return {"fps": fps, "frames": frames, "duration": frames / fps, "width": width, "height": height,
                "codec": stream.codec_context.name}


@functools.lru_cache(maxsize=1)
def x264_options() -> dict:
    """libx264 options that make a re-encode the same bytes on every run: one thread, and on x86 CPUs with AVX2
    the fixed kernel set :data:`X264_KERNELS` (elsewhere x264 picks its kernels)."""
    options = {"threads": "1"}
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        flags = []
    if _AVX2_FLAGS <= set(flags):
        options["x264-params"] = f"asm={X264_KERNELS}"
    return options


def reencode(data: bytes, max_side: int, where: str) -> bytes:
    """The clip re-encoded (H.264 where available, else MPEG-4) so that its longer side is at most ``max_side``."""
    import av

    container, stream = _open(data, where)
    fps = stream.average_rate or stream.guessed_rate or 25
    out = io.BytesIO()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with container, av.open(out, "w", format="mp4") as target:
        encoder = None
        for number, frame in enumerate(container.decode(stream)):
            if encoder is None:
                scale = min(1.0, max_side / max(frame.width, frame.height))
                encoder = target.add_stream(codec, rate=fps, options=x264_options() if codec == "libx264" else {})
                encoder.width = max(2, int(frame.width * scale) // 2 * 2)
                encoder.height = max(2, int(frame.height * scale) // 2 * 2)
                encoder.pix_fmt = "yuv420p"
                encoder.codec_context.time_base = Fraction(1, 1) / Fraction(fps)
            resized = frame.reformat(width=encoder.width, height=encoder.height, format="yuv420p")
            resized.pts = number
            resized.time_base = encoder.codec_context.time_base
            for packet in encoder.encode(resized):
                target.mux(packet)
        if encoder is None:
            raise BadInputError(where, "no decodable frames")
        for packet in encoder.encode():
            target.mux(packet)
    return out.getvalue()


def video_sample(path: str, rel: str, max_side: Optional[int] = None) -> dict:
    """``{"mp4": clip bytes, "json": metadata}`` for one video file (re-encoded when ``max_side`` is set)."""
    with open(path, "rb") as handle:
        data = handle.read()
    probe_video(data, path)
    if max_side:
        data = reencode(data, max_side, path)
    meta = dict(probe_video(data, path), source=rel)
    return {"mp4": data, "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def video_samples(labels: Optional[str] = None, max_side: Optional[int] = None):
    """``make_samples`` of the ``video`` kind (one sample per clip, re-encoded above ``max_side``)."""
    return one_sample(labelled(functools.partial(video_sample, max_side=max_side), labels))


def frame_indices(total: int, count: int, stride: int, mode: str, gen: Optional[torch.Generator]) -> List[int]:
    """``count`` frame numbers of a ``total``-frame clip.

    ``stride``: every ``stride``-th frame from a random start (clamped to the last frame when the
    clip is too short). ``segment``: the clip cut into ``count`` equal segments, one random frame
    in each (TSN-style; frames repeat when the clip has fewer than ``count``). With ``gen`` None
    (evaluation) the choices are centred: the middle window, or each segment's middle frame.
    """
    if total < 1 or count < 1:
        raise ValueError(f"cannot pick {count} frames of a {total}-frame clip")
    if mode == "segment":
        edges = np.linspace(0, total, count + 1)
        draws = _torch().rand(count, generator=gen).tolist() if gen is not None else [0.5] * count
        return [min(total - 1, int(lo + u * max(hi - lo, 1e-9))) for lo, hi, u in zip(edges[:-1], edges[1:], draws)]
    if mode != "stride":
        raise ValueError(f"frame sampling {mode!r} is not 'stride' or 'segment'")
    span = (count - 1) * stride + 1
    if span > total:
        start = 0
    elif gen is None:
        start = (total - span) // 2
    else:
        start = int(_torch().randint(0, total - span + 1, (1,), generator=gen).item())
    return [min(start + i * stride, total - 1) for i in range(count)]


def _torch():
    """torch, imported on first use: conversion workers, which only write clips, start without it."""
    import torch

    return torch


def decode_frames(data: bytes, indices: List[int], where: str) -> np.ndarray:
    """The frames numbered ``indices`` (0-based, in presentation order) as uint8 ``[T, H, W, 3]``.

    Decoding seeks to the key frame before the first wanted frame and stops after the last; a
    wanted frame the stream does not deliver takes the nearest earlier decoded frame.

    Raises:
        BadInputError: unreadable clip or no frame decoded.
    """
    container, stream = _open(data, where)
    wanted = sorted(set(indices))
    wanted_set, found, last = set(wanted), {}, None
    with container:
        try:
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            base = float(stream.time_base or 0)
            origin = stream.start_time or 0
            if wanted[0] > 0 and rate and base:
                container.seek(origin + int(wanted[0] / rate / base), stream=stream, backward=True)
            for frame in container.decode(stream):
                number = round((frame.pts - origin) * base * rate) if frame.pts is not None and rate else len(found)
                if number > wanted[-1]:
                    break
                last = (number, frame)
                if number in wanted_set:
                    found[number] = frame.to_ndarray(format="rgb24")
            if last is not None and last[0] not in found:  # the stream ended early or skipped numbers
                found[last[0]] = last[1].to_ndarray(format="rgb24")
        except Exception as exc:
            raise BadInputError(where, f"cannot decode video: {exc}") from None
    if not found:
        raise BadInputError(where, "no decodable frames")
    numbers = sorted(found)
    out = []
    for index in indices:
        earlier = [n for n in numbers if n <= index]
        out.append(found[earlier[-1] if earlier else numbers[0]])
    return np.stack(out)
