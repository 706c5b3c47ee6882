"""Tests for data_pipeline/xray_io.py: DICOM and PNG/JPEG/TIFF X-rays into uint16 images plus metadata."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_pipeline.errors import BadInputError
from data_pipeline.xray_io import is_xray_file, read_xray

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MONOCHROME1_TEST_FILE = "dicomdirtests/77654033/CR1/6154"  # a real CR X-ray stored as MONOCHROME1
EXPECTED_KEYS = {
    "source", "format", "modality", "photometric", "height", "width",
    "pixel_spacing", "patient_id_hash", "study_id_hash", "inverted",
}


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> str:
    """Save ``pixels`` (uint16 [H, W] or [frames, H, W]) as an uncompressed CR DICOM file at ``path``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def ramp(levels: int = 16) -> np.ndarray:
    """A [4, levels // 4] uint16 image holding 0, 1, ..., levels - 1."""
    return np.arange(levels, dtype=np.uint16).reshape(4, -1)


def test_ct_small_maps_to_full_uint16_range_with_metadata():
    image, meta = read_xray(get_testdata_file("CT_small.dcm"))
    assert image.dtype == np.uint16 and image.shape == (128, 128)
    assert image.min() == 0 and image.max() == 65535
    assert set(meta) == EXPECTED_KEYS
    assert meta["format"] == "dicom" and meta["modality"] == "CT" and meta["photometric"] == "MONOCHROME2"
    assert (meta["height"], meta["width"]) == (128, 128)
    assert meta["pixel_spacing"] == pytest.approx([0.661468, 0.661468])
    assert meta["source"] == "CT_small.dcm" and meta["inverted"] is False
    json.dumps(meta)


def test_identifiers_are_hashed_never_stored_raw(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", ramp(), PatientID="PAT-12345", StudyInstanceUID="1.2.3.4")
    _, meta = read_xray(path)
    assert meta["patient_id_hash"] == hashlib.sha256(b"PAT-12345").hexdigest()[:16]
    assert meta["study_id_hash"] == hashlib.sha256(b"1.2.3.4").hexdigest()[:16]
    assert "PAT-12345" not in json.dumps(meta) and "1.2.3.4" not in json.dumps(meta)
    _, mr_meta = read_xray(get_testdata_file("MR_small.dcm"))
    assert len(mr_meta["patient_id_hash"]) == 16 and "4MR1" not in json.dumps(mr_meta)


def test_missing_identifiers_and_spacing_are_null(tmp_path):
    _, meta = read_xray(write_dicom(tmp_path / "x.dcm", ramp()))
    assert meta["patient_id_hash"] is None and meta["study_id_hash"] is None and meta["pixel_spacing"] is None


def test_imager_pixel_spacing_is_used_when_pixel_spacing_is_absent(tmp_path):
    _, meta = read_xray(write_dicom(tmp_path / "x.dcm", ramp(), ImagerPixelSpacing=[0.139, 0.143]))
    assert meta["pixel_spacing"] == pytest.approx([0.139, 0.143])


def test_linear_stretch_without_window_is_exact(tmp_path):
    pixels = np.array([[0, 5], [10, 15]], dtype=np.uint16) + 1000
    image, _ = read_xray(write_dicom(tmp_path / "x.dcm", pixels))
    np.testing.assert_array_equal(image, [[0, 21845], [43690, 65535]])


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    pixels = np.array([[0, 5], [10, 15]], dtype=np.uint16)
    image, meta = read_xray(write_dicom(tmp_path / "x.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(image, [[65535, 43690], [21845, 0]])
    assert meta["inverted"] is True and meta["photometric"] == "MONOCHROME1"


def test_real_monochrome1_file_is_the_inverse_of_its_monochrome2_twin(tmp_path):
    path = get_testdata_file(MONOCHROME1_TEST_FILE)
    image, meta = read_xray(path)
    assert meta["photometric"] == "MONOCHROME1" and meta["inverted"] is True and meta["modality"] == "CR"
    twin = pydicom.dcmread(path)
    twin.PhotometricInterpretation = "MONOCHROME2"
    twin.save_as(tmp_path / "twin.dcm")
    twin_image, twin_meta = read_xray(str(tmp_path / "twin.dcm"))
    assert twin_meta["inverted"] is False
    np.testing.assert_array_equal(image, 65535 - twin_image)


def test_rescale_is_applied_before_the_window(tmp_path):
    # stored 0..15 -> rescaled -50..100 -> LINEAR_EXACT window [5, 45]: stored 0..5 saturate low, 10..15 high
    path = write_dicom(
        tmp_path / "x.dcm", ramp(), RescaleSlope=10, RescaleIntercept=-50,
        WindowCenter=25, WindowWidth=40, VOILUTFunction="LINEAR_EXACT",
    )
    image, _ = read_xray(path)
    flat = image.ravel()
    assert (flat[:6] == 0).all() and (flat[10:] == 65535).all()
    np.testing.assert_array_equal(flat[6:10], np.rint(65535 * np.array([0.125, 0.375, 0.625, 0.875])))


def test_multi_frame_keeps_frame_zero(tmp_path):
    frames = np.stack([ramp(), ramp()[::-1]])
    image, meta = read_xray(write_dicom(tmp_path / "x.dcm", frames))
    assert image.shape == (4, 4) and (meta["height"], meta["width"]) == (4, 4)
    np.testing.assert_array_equal(image, ramp().astype(np.uint32) * 4369)


def test_constant_image_maps_to_zeros(tmp_path):
    image, _ = read_xray(write_dicom(tmp_path / "x.dcm", np.full((3, 3), 700, np.uint16), photometric="MONOCHROME1"))
    assert image.dtype == np.uint16 and not image.any()


def test_colour_dicom_is_refused():
    path = get_testdata_file("SC_rgb_small_odd.dcm")
    with pytest.raises(BadInputError, match="colour") as info:
        read_xray(path)
    assert info.value.where == path


def test_dicom_without_pixel_data_is_refused():
    with pytest.raises(BadInputError, match="no pixel data"):
        read_xray(get_testdata_file("rtplan.dcm"))


def test_truncated_dicom_raises_bad_input_naming_the_file(tmp_path):
    path = tmp_path / "truncated.dcm"
    path.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:2000])
    with pytest.raises(BadInputError) as info:
        read_xray(str(path))
    assert info.value.where == str(path) and str(path) in str(info.value)


def test_garbage_with_dicom_extension_raises_bad_input(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00\x01 this is not DICOM " * 10)
    with pytest.raises(BadInputError, match="garbage.dcm"):
        read_xray(str(path))


def test_extensionless_dicom_is_detected_by_its_preamble(tmp_path):
    path = tmp_path / "IM0001"
    shutil.copy(get_testdata_file("MR_small.dcm"), path)
    other = tmp_path / "README"
    other.write_text("not an image")
    assert is_xray_file(str(path)) and not is_xray_file(str(other))
    assert is_xray_file(str(tmp_path / "a.PNG")) and not is_xray_file(str(tmp_path / "notes.txt"))
    image, meta = read_xray(str(path))
    assert meta["format"] == "dicom" and image.shape == (64, 64)
    with pytest.raises(BadInputError, match="not a recognised X-ray file"):
        read_xray(str(other))


@pytest.mark.parametrize("extension, expected_format", [(".png", "png"), (".tif", "tiff")])
def test_16_bit_image_round_trips_exactly(tmp_path, extension, expected_format):
    pixels = np.random.default_rng(0).integers(0, 65536, size=(17, 23), dtype=np.uint16)
    path = tmp_path / f"x{extension}"
    Image.fromarray(pixels).save(path)
    image, meta = read_xray(str(path))
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, pixels)
    assert set(meta) == EXPECTED_KEYS and meta["format"] == expected_format
    assert meta["modality"] is None and meta["pixel_spacing"] is None and meta["inverted"] is False


def test_8_bit_png_is_scaled_by_257(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(9, 11), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image, _ = read_xray(str(tmp_path / "x.png"))
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, pixels.astype(np.uint16) * 257)


def test_rgb_image_becomes_luminance(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(6, 7, 3), dtype=np.uint8))
    rgb.save(tmp_path / "x.png")
    image, _ = read_xray(str(tmp_path / "x.png"))
    np.testing.assert_array_equal(image, np.asarray(rgb.convert("L")).astype(np.uint16) * 257)


def test_jpeg_reads_as_uint16(tmp_path):
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "x.jpg")
    image, meta = read_xray(str(tmp_path / "x.jpg"))
    assert image.dtype == np.uint16 and image.shape == (8, 8) and meta["format"] == "jpeg"


def test_corrupt_png_raises_bad_input_naming_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(BadInputError) as info:
        read_xray(str(path))
    assert info.value.where == str(path)


def test_missing_file_raises_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        read_xray(str(tmp_path / "absent.png"))
