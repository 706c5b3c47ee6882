"""CT volumes from NIfTI files and DICOM series -> int16 Hounsfield units in one orientation.

Every volume comes out as ``int16 [D, H, W]`` indexed ``[z, y, x]`` in LPS order: x grows
towards the patient's Left, y towards Posterior, z towards Superior (axial slices as a DICOM
viewer shows them, slice 0 the most inferior), with ``spacing`` ``[dz, dy, dx]`` in mm. NIfTI
files are reoriented from their affine, DICOM series from ImageOrientationPatient /
ImagePositionPatient, so both formats give the same array for the same scan.

Whatever cannot become a sound volume (unreadable file, NaN voxels, a series with missing
or duplicate slices, slices of different sizes) raises :class:`BadInputError` naming it.
"""
from __future__ import annotations

import io
import json
import os
from collections import defaultdict

import numpy as np

from data_pipeline.errors import BadInputError
from data_pipeline.xray_io import hash_identifier
from data_pipeline.write_shards import source_items

NIFTI_SUFFIXES = (".nii", ".nii.gz")
HU_RANGE = (-32768, 32767)
_LPS = ("L", "P", "S")


def is_nifti(path: str) -> bool:
    """A NIfTI file, by name."""
    return path.lower().endswith(NIFTI_SUFFIXES)


def _to_lps_zyx(data_xyz: np.ndarray, affine_ras: np.ndarray, where: str) -> tuple:
    """Reorient voxel data ``[i, j, k]`` with a RAS affine to ``[z, y, x]`` LPS; returns (array, spacing zyx)."""
    import nibabel.orientations as orient

    ornt = orient.io_orientation(affine_ras)
    transform = orient.ornt_transform(ornt, orient.axcodes2ornt(_LPS))
    lps = orient.apply_orientation(data_xyz, transform)
    zooms = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))
    spacing_xyz = [float(zooms[int(np.flatnonzero(transform[:, 0] == axis)[0])]) for axis in range(3)]
    if not all(np.isfinite(spacing_xyz)) or min(spacing_xyz) <= 0:
        raise BadInputError(where, f"voxel spacing {spacing_xyz} is not positive")
    return np.ascontiguousarray(lps.transpose(2, 1, 0)), spacing_xyz[::-1]


def to_hu_int16(values: np.ndarray, where: str) -> np.ndarray:
    """Float HU -> int16 (rounded, clipped to the int16 range); refuses non-finite voxels."""
    if values.size == 0:
        raise BadInputError(where, "empty volume")
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise BadInputError(where, f"volume has {bad} non-finite (NaN/inf) voxel(s) of {values.size}")
    return np.clip(np.rint(values), *HU_RANGE).astype(np.int16)


def read_nifti(path: str) -> tuple:
    """A NIfTI CT volume -> (int16 HU ``[z, y, x]`` LPS, metadata).

    The stored values after the header's scl_slope / scl_inter are taken as HU. A 4D file
    keeps its first volume.

    Raises:
        BadInputError: unreadable file or header, not 3D/4D, non-finite voxels.
    """
    import nibabel as nib

    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = img.affine
    except Exception as exc:
        raise BadInputError(path, f"not a readable NIfTI file: {exc}") from None
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadInputError(path, f"expected a 3D volume, got shape {data.shape}")
    volume, spacing = _to_lps_zyx(data, affine, path)
    meta = {"format": "nifti", "spacing": spacing, "orientation": "LPS [z, y, x]", "series_id_hash": None,
            "study_id_hash": None, "patient_id_hash": None}
    return to_hu_int16(volume, path), meta


def _looks_like_dicom(path: str) -> bool:
    """A ``.dcm`` name or the ``DICM`` magic at byte 128."""
    if path.lower().endswith(".dcm"):
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def dicom_series(paths: list) -> tuple:
    """Group DICOM image slices by SeriesInstanceUID.

    Returns:
        (``{uid: [paths]}``, ``[(path, reason)]`` for files that look like DICOM (``.dcm`` or the
        DICM magic) but cannot be read or are no image slice: truncated headers, reports,
        DICOMDIRs). Other files are left out.
    """
    import pydicom

    groups, bad = defaultdict(list), []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            if _looks_like_dicom(path):
                bad.append((path, f"corrupt DICOM: {exc}"))
            continue
        uid = header.get("SeriesInstanceUID")
        if uid and "Rows" in header and "ImagePositionPatient" in header:
            groups[str(uid)].append(path)
        elif _looks_like_dicom(path):
            missing = [k for k in ("SeriesInstanceUID", "Rows", "ImagePositionPatient") if k not in header]
            bad.append((path, f"corrupt DICOM or not an image slice: no {', '.join(missing)}"))
    return dict(groups), bad


def _slice_geometry(datasets: list, where: str) -> tuple:
    """(row direction, column direction, normal, positions along the normal) of a series' slices."""
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise BadInputError(where, f"ImageOrientationPatient {orientation.tolist()} is not orthonormal")
    positions = np.array([np.dot(normal, np.array(ds.ImagePositionPatient, dtype=np.float64)) for ds in datasets])
    return row_dir, col_dir, normal, positions


def read_dicom_series(paths: list, where: str) -> tuple:
    """The slices of one DICOM series -> (int16 HU ``[z, y, x]`` LPS, metadata).

    Slices are sorted by their position along the slice normal; pixel values go through
    RescaleSlope / RescaleIntercept (the modality LUT) into HU.

    Raises:
        BadInputError: naming ``where`` (the series folder and UID) for fewer than 2 slices,
            duplicate or missing slices (a gap over 1.5x the median spacing), slices of
            different sizes or orientations, or unreadable pixel data.
    """
    import pydicom

    if len(paths) < 2:
        raise BadInputError(where, f"{len(paths)} slice: a volume needs at least 2")
    try:
        datasets = [pydicom.dcmread(path) for path in paths]
    except Exception as exc:
        raise BadInputError(where, f"unreadable DICOM slice: {exc}") from None
    if len({(int(ds.Rows), int(ds.Columns)) for ds in datasets}) != 1:
        raise BadInputError(where, "slices of different sizes")
    if len({tuple(np.round(np.array(ds.ImageOrientationPatient, float), 4)) for ds in datasets}) != 1:
        raise BadInputError(where, "slices with different orientations")
    row_dir, col_dir, normal, positions = _slice_geometry(datasets, where)
    order = np.argsort(positions)
    datasets, positions = [datasets[i] for i in order], positions[order]
    steps = np.diff(positions)
    median = float(np.median(steps))
    if median <= 1e-3 or steps.min() <= 1e-3:
        raise BadInputError(where, "duplicate slice positions")
    if steps.max() > 1.5 * median:
        gap = int(np.argmax(steps))
        missing = int(round(steps[gap] / median)) - 1
        raise BadInputError(where, f"missing slices: a {steps[gap]:.2f} mm gap after slice {gap} "
                                   f"(median spacing {median:.2f} mm; about {missing} slice(s) missing)")
    try:
        stack = np.stack([
            ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1)
            + float(ds.get("RescaleIntercept", 0) or 0)
            for ds in datasets
        ])
    except Exception as exc:
        raise BadInputError(where, f"cannot decode pixel data: {exc}") from None
    row_spacing, col_spacing = (float(v) for v in datasets[0].get("PixelSpacing", [1.0, 1.0]))
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing  # i: along a row (column index)
    affine_lps[:3, 1] = col_dir * row_spacing  # j: down a column (row index)
    affine_lps[:3, 2] = normal * median
    affine_lps[:3, 3] = np.array(datasets[0].ImagePositionPatient, dtype=np.float64)
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    volume, spacing = _to_lps_zyx(stack.transpose(2, 1, 0), affine_ras, where)
    first = datasets[0]
    meta = {"format": "dicom", "spacing": spacing, "orientation": "LPS [z, y, x]",
            "series_id_hash": hash_identifier(first.SeriesInstanceUID),
            "study_id_hash": hash_identifier(first.get("StudyInstanceUID")),
            "patient_id_hash": hash_identifier(first.get("PatientID")), "slices": len(datasets)}
    return to_hu_int16(volume, where), meta


def ct_sources(src: str) -> list:
    """The volumes under ``src``: ``[(rel name, ("nifti", path) | ("dicom", [paths]) | ("bad", reason))]``.

    NIfTI files are volumes of their own; other files are read as DICOM and grouped by series
    (a series is named by its folder and UID). Unreadable DICOM files become ``bad`` entries,
    so the shard writer lists them as skipped.
    """
    files = [path for _, path in source_items(src, lambda path: True)]
    volumes = [(os.path.relpath(p, src).replace(os.sep, "/"), ("nifti", p)) for p in files if is_nifti(p)]
    others = [p for p in files if not is_nifti(p)]
    groups, bad = dicom_series(others)
    volumes.extend((os.path.relpath(p, src).replace(os.sep, "/"), ("bad", reason)) for p, reason in bad)
    for uid, paths in sorted(groups.items()):
        folder = os.path.relpath(os.path.dirname(sorted(paths)[0]), src).replace(os.sep, "/")
        volumes.append((f"{folder}/series-{uid}", ("dicom", sorted(paths))))
    return sorted(volumes)


def read_ct(item: tuple, where: str) -> tuple:
    """One entry of :func:`ct_sources` -> (int16 HU volume, metadata)."""
    kind, payload = item
    if kind == "bad":
        raise BadInputError(where, payload)
    return read_nifti(payload) if kind == "nifti" else read_dicom_series(payload, where)


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (lossless; what :func:`data_pipeline.decoders.decode_npy` reads back)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def ct_sample(item: tuple, rel: str) -> dict:
    """``{"npy": int16 HU [z, y, x], "json": metadata}`` for one volume (spacing, orientation, ids, HU range)."""
    volume, meta = read_ct(item, rel)
    meta.update(source=rel, shape=list(volume.shape), hu_min=int(volume.min()), hu_max=int(volume.max()))
    return {"npy": encode_npy(volume), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
