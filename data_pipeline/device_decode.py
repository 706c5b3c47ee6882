"""JPEG decode on the training device (``data.decode_device=cuda``): workers draw, the GPU decodes and applies.

With ``cuda``, a pathology source's loader workers do not decode its tiles. For each sample a worker reads
the image header only (format, mode, size: PIL, no pixels), decodes the other fields as the CPU path does,
and draws every random choice of the view (crop boxes, flips, turns, colour steps: the view's ``draw``,
the same generator and order as the CPU path) plus the objective's masks. The sample carries its
encoded bytes and choices as :data:`ENCODED` (an :class:`Encoded`, not a tensor, so the reused batch
buffers leave it alone); collation packs a batch's bytes into one flat ``uint8`` tensor
(:class:`EncodedBatch`: one shared-memory hand-over per batch, not one per sample). In the training
process :class:`DeviceDecode` (the :class:`~data_pipeline.batch_memory.ReleasingLoader`'s last step)
decodes the batch in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvjpeg on a GPU) and
applies the drawn choices with the view's ``apply`` (the same code the CPU path runs) on the device.

What stays on the host: the header read, the draws and the masks (host-side randomness, drawn from the
sample's seed in the workers, as everywhere); images that are not baseline-decodable JPEG (PNG tiles,
CMYK JPEGs) are decoded in the training process by the CPU path's decoder (PIL), said once in the log;
video (mp4 through PyAV) and the other modalities keep the CPU path.

The CPU path is the reference: the device path's views equal it within :data:`TOLERANCE` (nvjpeg and
libjpeg-turbo round the inverse DCT and chroma upsampling differently by a few levels).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from PIL import Image

from data_pipeline.decoders import NPY_MAGIC, decode_encoded_image, decode_image, decode_npy
from data_pipeline.errors import BadInputError
from data_pipeline.transforms_2d import to_unit_tensor

log = logging.getLogger(__name__)

ENCODED = "__encoded__"
"""Sample and batch field of the undecoded image and its drawn choices (device path only)."""
DECODE_DEVICES = ("cpu", "cuda")
"""The values of ``data.decode_device``."""
DEVICE_MODES = ("RGB", "L")
"""PIL modes of the JPEGs decoded on the device (as the CPU path's decoder gives them: 3 and 1 channel)."""
TOLERANCE = {"max_abs": 8 / 255, "mean_abs": 0.5 / 255}
"""Device path vs CPU path, in [0, 1] pixel units after undoing the normalisation (``view * std + mean``):
the largest and the mean absolute difference over a batch's views. A decoder's level of difference
moves a pixel by 1/255 before the view; a resize averages such differences, but the colour steps
scale them (contrast and brightness up to 1.4 each, the stain jitter's log near dark pixels), and a
rotated or flipped crop is the same arithmetic; measured on the CPU (torchvision's libjpeg-turbo vs
PIL's): 0 difference; nvjpeg is expected at 1-3 levels before the view (see docs/ARCHITECTURE.md)."""
_EOI = b"\xff\xd9"

_warned: set = set()


def warn_once(key: str, message: str, *args) -> None:
    """``log.warning(message, *args)`` the first time ``key`` is met in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def decode_device(setting: str) -> Optional[torch.device]:
    """The device the training process decodes on for ``data.decode_device=setting``; None: the CPU path
    (workers decode). ``cuda`` without a CUDA device falls back to the CPU path, with a warning once.

    Raises:
        ValueError: ``setting`` is not one of :data:`DECODE_DEVICES`.
    """
    if setting not in DECODE_DEVICES:
        raise ValueError(f"data.decode_device={setting!r} is not one of {list(DECODE_DEVICES)}")
    if setting == "cpu":
        return None
    if not torch.cuda.is_available():
        warn_once("no_cuda", "data.decode_device=cuda but no CUDA device is available: the loader workers decode "
                             "the JPEGs (the CPU path)")
        return None
    return torch.device("cuda")  # the current device when decoding: the trainer sets it (LOCAL_RANK)


@dataclass
class Encoded:
    """One sample's undecoded image and the view's drawn choices (from the view's ``draw``)."""

    data: bytes
    on_device: bool
    """A JPEG of a :data:`DEVICE_MODES` mode (``decode_jpeg`` on the device); else the host decoder (PIL)."""
    choices: dict
    where: str


def read_header(data: bytes, where: str) -> tuple:
    """(channels, height, width, on_device) of encoded image bytes from their header; channels as the CPU
    path's decoder gives them. A JPEG that does not end with its end-of-image marker (truncated) is decoded
    here in full, so a broken file is refused in the worker, as on the CPU path.

    Raises:
        BadInputError: the header (or a truncated JPEG) cannot be read.
    """
    if data[:6] == NPY_MAGIC:  # raw pixels (--encoding npy): nothing to decode, kept on the host path
        try:
            shape = decode_npy(data).shape
        except Exception as exc:
            raise BadInputError(where, f"cannot read .npy image: {exc}") from exc
        if len(shape) not in (2, 3):
            raise BadInputError(where, f".npy is not a 2D image: shape {shape}")
        return (1 if len(shape) == 2 else shape[2]), shape[0], shape[1], False
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, (width, height), kind = image.mode, image.size, image.format
        if kind == "JPEG" and not data.endswith(_EOI):
            decode_image(data)
    except Exception as exc:
        raise BadInputError(where, f"cannot decode image: {exc}") from exc
    channels = 1 if mode in ("1", "L", "LA") or mode.startswith("I") else 3
    return channels, height, width, kind == "JPEG" and mode in DEVICE_MODES


@dataclass
class EncodedBatch:
    """A batch's :class:`Encoded` samples: their bytes packed into one flat ``uint8`` tensor."""

    flat: torch.Tensor
    lengths: List[int]
    on_device: List[bool]
    choices: List[dict]
    where: List[str]

    def tensors(self) -> List[torch.Tensor]:
        """Each sample's encoded bytes as a 1-D ``uint8`` tensor (views of ``flat``)."""
        return list(torch.split(self.flat, self.lengths))


def pack(items: List[Encoded]) -> EncodedBatch:
    """Collate samples' :class:`Encoded` fields (one copy of the bytes)."""
    flat = torch.frombuffer(bytearray().join(item.data for item in items), dtype=torch.uint8)
    return EncodedBatch(flat, [len(item.data) for item in items], [item.on_device for item in items],
                        [item.choices for item in items], [item.where for item in items])


def _on_host(data: torch.Tensor, where: str) -> torch.Tensor:
    """The CPU path's decode of one image ([C, H, W] in [0, 1] on the host)."""
    try:
        return to_unit_tensor(decode_encoded_image(data.numpy().tobytes()), where)
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(where, f"cannot decode image: {exc}") from exc


def _jpegs(tensors: List[torch.Tensor], wheres: List[str], device: torch.device) -> List[torch.Tensor]:
    """``decode_jpeg`` of a list on ``device`` in one call ([C, H, W] uint8); where the batch call fails,
    image by image, and an image the device decoder refuses by the host decoder."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(tensors, mode=ImageReadMode.UNCHANGED, device=device)
    except RuntimeError:
        decoded = []
        for data, where in zip(tensors, wheres):
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device))
            except RuntimeError as exc:
                warn_once(f"refused:{where}", "%s: the device's JPEG decoder refused it (%s): decoded on the host",
                          where, exc)
                decoded.append((_on_host(data, where) * 255).round().to(torch.uint8).to(device))
        return decoded


def decode_images(batch: EncodedBatch, device: torch.device) -> List[torch.Tensor]:
    """The batch's images as float ``[C, H, W]`` in [0, 1] on ``device``, in order."""
    tensors = batch.tensors()
    images: List[Optional[torch.Tensor]] = [None] * len(tensors)
    jpegs = [index for index, on_device in enumerate(batch.on_device) if on_device]
    if jpegs:
        decoded = _jpegs([tensors[i] for i in jpegs], [batch.where[i] for i in jpegs], device)
        for index, image in zip(jpegs, decoded):
            images[index] = image.to(torch.float32) / 255.0
    for index, on_device in enumerate(batch.on_device):
        if not on_device:
            warn_once("host", "%s is not a baseline RGB/gray JPEG: such images are decoded in the training "
                              "process on its CPU (data.decode_device=cuda decodes JPEGs only)", batch.where[index])
            images[index] = _on_host(tensors[index], batch.where[index]).to(device)
    return images


class DeviceDecode:
    """The training process's step of the device path: a batch's :data:`ENCODED` field -> its views.

    Args:
        views: source name -> the view its preparer drew for (``draw``/``apply``: single or multicrop).
        device: where to decode and apply (cuda; cpu runs the same path with torchvision's CPU decoder).
    """

    def __init__(self, views: Dict[str, object], device: torch.device):
        self.views = views
        self.device = torch.device(device)

    def __call__(self, batch: dict) -> dict:
        """``batch`` with :data:`ENCODED` replaced by the stacked views (on the device); other batches as
        they are."""
        encoded = batch.pop(ENCODED, None)
        if encoded is None:
            return batch
        view = self.views[batch["source"]]
        made = [view.apply(view.match_channels(image, where), choices)
                for image, choices, where in zip(decode_images(encoded, self.device), encoded.choices,
                                                  encoded.where)]
        for name in made[0]:
            batch[name] = torch.stack([views[name] for views in made])
        return batch
