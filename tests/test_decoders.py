"""Tests for data_pipeline/decoders.py: per-extension decoding of raw WebDataset samples."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline import decoders
from data_pipeline.decoders import decode_sample, register_decoder
from data_pipeline.errors import BadInputError


def encoded(array: np.ndarray, file_format: str = "PNG") -> bytes:
    """``array`` saved with Pillow in ``file_format``, as bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=file_format)
    return buffer.getvalue()


def raw(**fields) -> dict:
    """A raw sample as WebDataset yields it."""
    return {"__key__": "sample1", "__url__": "shard-000.tar", **fields}


def test_images_decode_to_arrays_by_bit_depth_and_colour():
    gray16 = np.random.default_rng(0).integers(0, 65536, size=(5, 7), dtype=np.uint16)
    gray8 = np.arange(35, dtype=np.uint8).reshape(5, 7)
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=-1)
    fields = {"png": encoded(gray16), "gray.png": encoded(gray8), "rgb.png": encoded(rgb), "rgba.png": encoded(rgba)}
    out = decode_sample(raw(**fields))
    assert out["png"].dtype == np.uint16
    np.testing.assert_array_equal(out["png"], gray16)
    assert out["gray.png"].dtype == np.uint8
    np.testing.assert_array_equal(out["gray.png"], gray8)
    np.testing.assert_array_equal(out["rgb.png"], rgb)
    np.testing.assert_array_equal(out["rgba.png"], rgb)


@pytest.mark.parametrize("extension", ["jpg", "jpeg"])
def test_jpeg_decodes_gray_and_colour(extension):
    gray = decode_sample(raw(**{extension: encoded(np.full((8, 8), 100, np.uint8), "JPEG")}))[extension]
    colour = decode_sample(raw(**{extension: encoded(np.full((8, 8, 3), 100, np.uint8), "JPEG")}))[extension]
    assert gray.dtype == np.uint8 and gray.shape == (8, 8)
    assert colour.dtype == np.uint8 and colour.shape == (8, 8, 3)


def test_other_extensions_and_metadata_keys():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    npy = io.BytesIO()
    np.save(npy, array)
    out = decode_sample(raw(
        json=json.dumps({"source": "a/b.dcm", "height": 4}).encode(),
        npy=npy.getvalue(), txt="héllo".encode(), cls=b" 7\n", bin=b"\x00\x01",
    ))
    assert out["json"] == {"source": "a/b.dcm", "height": 4}
    assert out["npy"].dtype == np.float32
    np.testing.assert_array_equal(out["npy"], array)
    assert out["txt"] == "héllo" and out["cls"] == 7 and out["bin"] == b"\x00\x01"
    assert out["__key__"] == "sample1" and out["__url__"] == "shard-000.tar"


def test_decode_sample_returns_a_new_dict():
    sample = raw(cls=b"3")
    decode_sample(sample)
    assert sample["cls"] == b"3"


@pytest.mark.parametrize("extension, data", [
    ("png", b"not a png"),
    ("jpg", b"\xff\xd8 broken"),
    ("json", b"{oops"),
    ("npy", b"\x93NUMPY garbage"),
    ("cls", b"cat"),
    ("txt", b"\xff\xfe\xfa"),
])
def test_bad_bytes_raise_bad_input_naming_shard_and_key(extension, data):
    with pytest.raises(BadInputError, match=rf"cannot decode \.{extension}") as info:
        decode_sample(raw(**{extension: data}))
    assert info.value.where == "shard-000.tar:sample1"
    assert str(info.value).startswith("shard-000.tar:sample1: ")


def test_pickled_npy_is_refused():
    npy = io.BytesIO()
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match="npy"):
        decode_sample(raw(npy=npy.getvalue()))


def test_registered_decoder_is_used_for_its_longest_suffix(monkeypatch):
    monkeypatch.setattr(decoders, "DECODERS", dict(decoders.DECODERS))
    register_decoder(".nii.gz", lambda data: len(data))
    mask = encoded(np.zeros((2, 2), np.uint8))
    out = decode_sample(raw(**{"nii.gz": b"abc", "seg.nii.gz": b"abcd", "mask.png": mask}))
    assert out["nii.gz"] == 3 and out["seg.nii.gz"] == 4 and out["mask.png"].shape == (2, 2)
    with pytest.raises(ValueError, match="already has decoder"):
        register_decoder("png", lambda data: data)


def test_large_members_of_a_local_tar_are_views_of_the_file_and_npy_decodes_them_without_copying(tmp_path):
    import tarfile

    from data_pipeline.shards import MAPPED_MIN, tar_members

    volume = np.arange(64 * 64 * 16, dtype=np.int16).reshape(16, 64, 64)
    buffer = io.BytesIO()
    np.save(buffer, volume)
    payload = buffer.getvalue()
    assert len(payload) >= MAPPED_MIN
    path = tmp_path / "ct-000000.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in (("v0.npy", payload), ("v0.json", b'{"spacing": [1, 1, 1]}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    members = {m["fname"]: m["data"] for m in tar_members(str(path))}
    assert isinstance(members["v0.npy"], memoryview) and members["v0.npy"] == payload
    assert isinstance(members["v0.json"], bytes)  # small members are plain bytes
    decoded = decoders.decode_npy(members["v0.npy"])
    np.testing.assert_array_equal(decoded, volume)
    assert not decoded.flags.owndata  # a view of the mapped file
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(path.read_bytes()[: 512 + len(payload) // 2])  # ends inside the volume
    with pytest.raises(BadInputError, match="truncated shard: member v0.npy ends at byte"):
        list(tar_members(str(cut)))
