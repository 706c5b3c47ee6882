"""Per-extension decoding of raw WebDataset samples.

A raw sample maps each field name (the file extension inside the tar, such as
``png`` or ``json``) to its bytes, plus ``__key__`` and ``__url__``. The
registry :data:`DECODERS` maps an extension to a ``bytes -> value`` function;
other modalities add theirs with :func:`register_decoder` (``nii.gz``, ``mp4``).
A field is decoded by its longest registered suffix, so ``mask.png`` uses the
``png`` decoder and ``seg.nii.gz`` would use ``nii.gz``.
"""

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.errors import BadInputError

Decoder = Callable[[bytes], Any]


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes → array.

    Returns:
        16-bit gray: ``uint16 [H, W]``; 8-bit gray: ``uint8 [H, W]``; colour
        (alpha dropped): ``uint8 [H, W, 3]``.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode.startswith("I;16"):
            return np.asarray(img).astype(np.uint16)
        if img.mode == "I":
            values = np.asarray(img)
            if values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
                raise ValueError("32-bit integer image with values outside the uint16 range")
            return values.astype(np.uint16)
        if img.mode in ("1", "L", "LA"):
            return np.asarray(img.convert("L"))
        return np.asarray(img.convert("RGB"))


def decode_json(data: bytes) -> Any:
    """UTF-8 JSON bytes → the parsed object (a dict for sample metadata)."""
    return json.loads(data.decode("utf-8"))


def decode_npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes (or a memoryview of a mapped shard) → a read-only numpy array viewing them (no copy;
    pickled object arrays are refused). Only the header is copied for parsing."""
    prefix = bytes(data[:12])
    wide = len(prefix) >= 8 and prefix[6] >= 2  # format 2.0 / 3.0: a 4-byte header length
    length_end = 12 if wide else 10
    header_end = length_end + int.from_bytes(prefix[8:length_end], "little")
    stream = io.BytesIO(bytes(data[:header_end]))
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - stream.tell() < count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data) - stream.tell()} bytes for {shape} {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def decode_text(data: bytes) -> str:
    """UTF-8 bytes → str."""
    return data.decode("utf-8")


def decode_class(data: bytes) -> int:
    """UTF-8 bytes of an integer class label (surrounding whitespace allowed) → int."""
    return int(data.decode("utf-8").strip())


DECODERS: dict[str, Decoder] = {
    "png": decode_image,
    "jpg": decode_image,
    "jpeg": decode_image,
    "json": decode_json,
    "npy": decode_npy,
    "txt": decode_text,
    "cls": decode_class,
}


def register_decoder(extension: str, decoder: Decoder) -> None:
    """Make :func:`decode_sample` decode fields ending in ``extension`` (no leading dot) with ``decoder``.

    Raises:
        ValueError: when ``extension`` already has a different decoder.
    """
    extension = extension.lower().lstrip(".")
    if DECODERS.get(extension, decoder) is not decoder:
        raise ValueError(f"extension {extension!r} already has decoder {DECODERS[extension].__name__}")
    DECODERS[extension] = decoder


def find_decoder(field: str) -> Decoder | None:
    """The decoder registered for the longest dot-separated suffix of ``field``, or None."""
    parts = field.lower().split(".")
    for start in range(len(parts)):
        decoder = DECODERS.get(".".join(parts[start:]))
        if decoder is not None:
            return decoder
    return None


def decode_sample(sample: dict) -> dict:
    """Decode every field of a raw WebDataset sample; returns a new dict.

    Fields starting with ``__`` are copied as they are, fields with a registered
    extension are decoded (see :data:`DECODERS`), others are left as bytes.

    Raises:
        BadInputError: ``"<url>:<key>: cannot decode .<ext>: <why>"`` for the
            first field that fails to decode.
    """
    decoded = {}
    for field, value in sample.items():
        decoder = None if field.startswith("__") else find_decoder(field)
        if decoder is None:
            decoded[field] = value
            continue
        try:
            decoded[field] = decoder(value)
        except Exception as exc:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            raise BadInputError(where, f"cannot decode .{field}: {exc}") from exc
    return decoded


IMAGE_FIELDS = ("png", "jpg", "jpeg", "npy")
"""Fields that hold a sample's 2D image, in order of preference (``npy``: a raw ``[H, W]`` / ``[H, W, C]``
array, ``pretrain shards --encoding npy``)."""
NPY_MAGIC = b"\x93NUMPY"


def decode_encoded_image(data: bytes) -> np.ndarray:
    """An image field's bytes, whichever of :data:`IMAGE_FIELDS` they came from, → array."""
    return decode_npy(data) if bytes(data[:6]) == NPY_MAGIC else decode_image(data)


def image_of(sample: dict, where: str) -> np.ndarray:
    """The decoded 2D image of a decoded sample (its ``png``, ``jpg``, ``jpeg`` or ``npy`` field).

    Raises:
        BadInputError: naming ``where`` when the sample has no image field.
    """
    for field in IMAGE_FIELDS:
        if field in sample:
            image = sample[field]
            if field == "npy" and (image.ndim not in (2, 3) or image.dtype not in (np.uint8, np.uint16)):
                raise BadInputError(where, f".npy is not a 2D uint8 / uint16 image: {image.dtype} {image.shape}")
            return image
    raise BadInputError(where, "sample has no .png/.jpg/.npy image")
