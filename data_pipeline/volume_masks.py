"""Label volumes beside CT volumes (``pretrain shards ct SRC OUT --masks DIR``), for the dense probe in 3D.

A volume ``SRC/a/b.nii.gz`` takes its labels from ``DIR/a/b.nii.gz``; a DICOM series, named
``folder/series-<UID>`` by :func:`data_pipeline.ct_io.ct_sources`, from ``DIR/folder/series-<UID>.nii.gz``. A label
file is a NIfTI volume of integer class ids 0..255 over the scan's voxels; it is reoriented by its own affine
as the scan is (to ``[z, y, x]`` LPS), must then have the scan's shape and spacing, and is stored beside it as
``seg.npy`` (uint8). At evaluation it follows the scan's deterministic view (the centred crop at the target
spacing, nearest; the middle slice of a 2.5D slab): :meth:`data_pipeline.volume.VolumeSampler.labels`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from data_pipeline.ct_io import NIFTI_SUFFIXES, _to_lps_zyx, ct_sample, encode_npy
from data_pipeline.errors import BadInputError
from data_pipeline.masks import VOLUME_MASK_FIELD, attach_masks
from data_pipeline.write_shards import labelled, one_sample


def volume_mask_path(masks: str, rel: str) -> str:
    """Where the labels of the volume named ``rel`` are: ``masks/<rel without .nii / .nii.gz>.nii.gz``."""
    stem = next((rel[: -len(suffix)] for suffix in NIFTI_SUFFIXES if rel.lower().endswith(suffix)), rel)
    return os.path.join(masks, stem + ".nii.gz")


def read_label_volume(path: str) -> tuple:
    """A label NIfTI -> (uint8 class ids ``[z, y, x]`` LPS, spacing ``[dz, dy, dx]``).

    Raises:
        BadInputError: naming the file when it is missing, unreadable, not 3D, or holds values that are not
            class ids 0..255.
    """
    import nibabel as nib

    if not os.path.isfile(path):
        raise BadInputError(path, "label file not found")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise BadInputError(path, f"not a readable NIfTI label file: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadInputError(path, f"expected a 3D label volume, got shape {data.shape}")
    if not np.isfinite(data).all() or (data != np.rint(data)).any() or data.min() < 0 or data.max() > 255:
        raise BadInputError(path, "labels must be integer class ids 0..255")
    labels, spacing = _to_lps_zyx(data.astype(np.uint8), img.affine, path)
    return labels, spacing


def fit_labels(labels: np.ndarray, spacing, sample: dict, path: str) -> np.ndarray:
    """``labels`` when they lie on the stored scan's grid (same shape, spacing within 1%).

    Raises:
        BadInputError: naming the label file and both shapes (or spacings).
    """
    meta = json.loads(sample["json"])
    shape, scan_spacing = tuple(meta["shape"]), meta["spacing"]
    if labels.shape != shape:
        raise BadInputError(path, f"labels are {' x '.join(map(str, labels.shape))} voxels, the scan "
                                  f"{' x '.join(map(str, shape))}")
    if not np.allclose(spacing, scan_spacing, rtol=0.01):
        raise BadInputError(path, f"label spacing {[round(v, 3) for v in spacing]} mm is not the scan's "
                                  f"{[round(v, 3) for v in scan_spacing]}")
    return labels


def _npy_labels(path: str, sample: dict) -> bytes:
    """The ``seg.npy`` bytes of the label file at ``path`` for a made scan sample (:func:`fit_labels`)."""
    return encode_npy(np.ascontiguousarray(fit_labels(*read_label_volume(path), sample, path)))


def with_volume_masks(make_sample: Callable[[object, str], dict], masks: Optional[str]) -> Callable:
    """``make_sample(item, rel)`` adding ``seg.npy`` from the label folder ``masks`` (a volume without a readable
    label file on its grid is skipped, the reason naming the label file)."""
    return attach_masks(make_sample, masks, volume_mask_path, _npy_labels, VOLUME_MASK_FIELD)


def ct_samples(labels: Optional[str] = None, masks: Optional[str] = None):
    """``make_samples`` of the ``ct`` kind (one sample per volume, ``cls`` from ``labels``, ``seg.npy`` from the
    label volumes in ``masks``)."""
    return one_sample(with_volume_masks(labelled(ct_sample, labels), masks))
