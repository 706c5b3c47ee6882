"""Read one X-ray file (DICOM, PNG, JPEG or TIFF) into a uint16 image plus metadata.

Every reader returns the same thing: a 2D ``uint16`` array ``[H, W]`` in which
bright means dense (bone), and a JSON-serialisable metadata dict whose keys are
the same for every format (``None`` where a format has no such field). Patient
and study identifiers are only ever stored as truncated SHA-256 hashes.

DICOM intensities go through the modality LUT (rescale slope/intercept), then
the VOI LUT or window when the file has one, and are then stretched linearly so
that the lowest value becomes 0 and the highest 65535; MONOCHROME1 images are
inverted on the way so that bone is bright.
"""

import hashlib
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from data_pipeline.errors import BadInputError

DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
UINT16_MAX = 65535
_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def has_dicom_preamble(path: str) -> bool:
    """Whether bytes 128:132 of the file at ``path`` are ``b"DICM"`` (False if unreadable)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(132)
    except OSError:
        return False
    return header[128:132] == b"DICM"


def is_xray_file(path: str) -> bool:
    """Whether ``path`` looks like an X-ray file that :func:`read_xray` should try.

    True for the known image and DICOM extensions, and for any other file whose
    bytes 128:132 are the DICOM marker ``DICM`` (DICOM files often have no
    extension, or a UID-like name such as ``1.2.840.113619.2.55``).
    """
    extension = os.path.splitext(path)[1].lower()
    if extension in IMAGE_EXTENSIONS or extension in DICOM_EXTENSIONS:
        return True
    return has_dicom_preamble(path)


def hash_identifier(value) -> str | None:
    """First 16 hex characters of the SHA-256 of ``str(value)``; None for a missing or empty value."""
    if value is None or str(value).strip() == "":
        return None
    return hashlib.sha256(str(value).strip().encode("utf-8")).hexdigest()[:16]


def stretch_to_uint16(values: np.ndarray, invert: bool = False) -> np.ndarray:
    """Map ``values`` linearly so that their minimum is 0 and maximum 65535.

    Args:
        values: real-valued image ``[H, W]``, all finite.
        invert: map the maximum to 0 and the minimum to 65535 instead.

    Returns:
        ``uint16`` array ``[H, W]``; all zeros when the image is constant.
    """
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint16)
    scaled = (high - values) if invert else (values - low)
    return np.rint(scaled * (UINT16_MAX / (high - low))).astype(np.uint16)


def read_xray(path: str) -> tuple[np.ndarray, dict]:
    """Read one X-ray file into a uint16 image and its metadata.

    Args:
        path: a DICOM file (``.dcm``/``.dicom`` or any file with the ``DICM``
            marker) or a PNG/JPEG/TIFF image.

    Returns:
        ``(image, metadata)``: ``image`` is ``uint16`` ``[H, W]`` with bone
        bright; ``metadata`` holds ``source`` (the basename), ``format``,
        ``modality``, ``photometric``, ``height``, ``width``, ``pixel_spacing``
        (``[row, col]`` mm or None), ``patient_id_hash``, ``study_id_hash`` and
        ``inverted``.

    Raises:
        BadInputError: naming ``path``, when the file cannot be read, is not a
            known format, or holds a colour image.
    """
    extension = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise BadInputError(path, "no such file")
    if extension in IMAGE_EXTENSIONS:
        return _read_pil_image(path)
    if extension in DICOM_EXTENSIONS or has_dicom_preamble(path):
        return _read_dicom(path, force=extension in DICOM_EXTENSIONS)
    raise BadInputError(
        path,
        f"not a recognised X-ray file (expected one of {DICOM_EXTENSIONS + IMAGE_EXTENSIONS} "
        "or a DICOM file with the DICM marker)",
    )


def _base_metadata(path: str, file_format: str, image: np.ndarray) -> dict:
    """Metadata keys shared by every format, with the format-specific ones set to None."""
    return {
        "source": os.path.basename(path),
        "format": file_format,
        "modality": None,
        "photometric": None,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "pixel_spacing": None,
        "patient_id_hash": None,
        "study_id_hash": None,
        "inverted": False,
    }


def _short_reason(exc: Exception) -> str:
    """An exception's type and message on one line (lines joined by "; "), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = f"{type(exc).__name__}: " + "; ".join(lines).replace(":; ", ": ")
    return message if len(message) <= 300 else message[:297] + "..."


def _read_dicom(path: str, force: bool) -> tuple[np.ndarray, dict]:
    """Decode the first frame of a grayscale DICOM file; see :func:`read_xray`."""
    try:
        dataset = pydicom.dcmread(path, force=force)
        if not any(tag in dataset for tag in _PIXEL_DATA_TAGS):
            modality = dataset.get("Modality")
            suffix = f" (Modality {modality})" if modality else ""
            raise BadInputError(path, f"DICOM file has no pixel data{suffix}")
        samples_per_pixel = int(dataset.get("SamplesPerPixel", 1))
        photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if samples_per_pixel != 1 or photometric not in _GRAYSCALE_PHOTOMETRICS:
            raise BadInputError(
                path,
                f"colour DICOM image (SamplesPerPixel {samples_per_pixel}, {photometric}); "
                "only grayscale X-rays are supported",
            )
        frame = pixel_array(dataset, index=0)
        values = apply_voi_lut(apply_modality_lut(frame, dataset), dataset)
        metadata = _dicom_metadata(path, dataset, photometric, frame)
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(path, f"cannot decode DICOM ({_short_reason(exc)})") from exc
    if values.ndim != 2:
        raise BadInputError(path, f"expected a 2D grayscale frame, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise BadInputError(path, "DICOM pixel values include NaN or infinity")
    return stretch_to_uint16(values, invert=metadata["inverted"]), metadata


def _dicom_metadata(path: str, dataset: pydicom.Dataset, photometric: str, frame: np.ndarray) -> dict:
    """Metadata of a DICOM frame ``[H, W]``, with the patient and study ids hashed."""
    metadata = _base_metadata(path, "dicom", frame)
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    modality = dataset.get("Modality")
    metadata.update(
        modality=str(modality) if modality else None,
        photometric=photometric,
        pixel_spacing=[float(spacing[0]), float(spacing[1])] if spacing and len(spacing) == 2 else None,
        patient_id_hash=hash_identifier(dataset.get("PatientID")),
        study_id_hash=hash_identifier(dataset.get("StudyInstanceUID")),
        inverted=photometric == "MONOCHROME1",
    )
    return metadata


def _read_pil_image(path: str) -> tuple[np.ndarray, dict]:
    """Read a PNG/JPEG/TIFF with Pillow; see :func:`read_xray`."""
    try:
        with Image.open(path) as img:
            img.load()
            file_format = (img.format or os.path.splitext(path)[1].lstrip(".")).lower()
            image = _pil_to_uint16(path, img)
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(path, f"cannot read image ({_short_reason(exc)})") from exc
    return image, _base_metadata(path, file_format, image)


def _pil_to_uint16(path: str, img: Image.Image) -> np.ndarray:
    """Grayscale ``uint16`` ``[H, W]`` from a Pillow image: 16-bit kept, 8-bit (or colour → luminance) times 257."""
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        values = np.asarray(img)
        if values.min() < 0 or values.max() > UINT16_MAX:
            raise BadInputError(path, f"32-bit integer image with values outside 0..{UINT16_MAX}")
        return values.astype(np.uint16)
    if img.mode == "F":
        raise BadInputError(path, "floating-point images are not supported; save as 8- or 16-bit")
    return np.asarray(img.convert("L")).astype(np.uint16) * 257
