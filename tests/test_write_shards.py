"""Tests for data_pipeline/write_shards.py: X-ray folders into WebDataset shards plus manifest.json."""

import json
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from data_pipeline.decoders import decode_sample
from data_pipeline.errors import BadInputError
from data_pipeline.shards import load_manifest
from data_pipeline.write_shards import sample_key
from data_pipeline.writers import write_tile_shards, write_xray_shards
from tests.conftest import make_tile_folder
from data_pipeline.xray_io import read_xray

GRAY16 = np.random.default_rng(0).integers(0, 65536, size=(12, 10), dtype=np.uint16)


@pytest.fixture
def xray_folder(tmp_path):
    """src/ with 8- and 16-bit PNGs, three DICOMs (one without extension), a corrupt .dcm and a text file."""
    src = tmp_path / "src"
    (src / "png").mkdir(parents=True)
    (src / "dicom" / "series").mkdir(parents=True)
    Image.fromarray(GRAY16).save(src / "png" / "gray16.png")
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(src / "png" / "gray8.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "dicom" / "CT_small.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "dicom" / "MR_small.dcm")
    shutil.copy(get_testdata_file("dicomdirtests/77654033/CR1/6154"), src / "dicom" / "series" / "6154")
    (src / "broken.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:1500])
    (src / "notes.txt").write_text("not an image")
    return src


def read_shard(path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every sample in one tar shard, in tar order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples[key][extension] = tar.extractfile(member).read()
    return dict(samples)


def test_shards_and_manifest_match_the_source(xray_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    manifest = write_xray_shards(str(xray_folder), str(out), samples_per_shard=2, progress=False)

    assert manifest["modality"] == "xray" and manifest["format_version"] == 1
    assert manifest["source"] == str(xray_folder)
    # parts of 2 sources, one shard each: broken.dcm (the first source) leaves its part's shard one short
    assert [s["samples"] for s in manifest["shards"]] == [1, 2, 2]
    assert [s["name"] for s in manifest["shards"]] == ["xray-000000.tar", "xray-000001.tar", "xray-000002.tar"]
    assert manifest["total_samples"] == 5
    assert [s["file"] for s in manifest["skipped"]] == ["broken.dcm"]
    assert sorted(os.listdir(out)) == [".convert", "manifest.json"] + [s["name"] for s in manifest["shards"]]
    assert load_manifest(str(out)) == manifest
    assert "broken.dcm" in capsys.readouterr().err

    samples = {}
    for entry in manifest["shards"]:
        shard = read_shard(out / entry["name"])
        assert len(shard) == entry["samples"]
        for key, fields in shard.items():
            assert set(fields) == {"png", "json"} and "." not in key and key not in samples
            samples[key] = decode_sample({"__key__": key, "__url__": entry["name"], **fields})
    by_source = {sample["json"]["source"]: sample for sample in samples.values()}
    assert sorted(by_source) == [
        "dicom/CT_small.dcm", "dicom/MR_small.dcm", "dicom/series/6154", "png/gray16.png", "png/gray8.png",
    ]
    for rel, sample in by_source.items():
        expected, metadata = read_xray(str(xray_folder / rel))
        assert sample["png"].dtype == np.uint16
        np.testing.assert_array_equal(sample["png"], expected)
        assert sample["json"] == {**metadata, "source": rel}
    np.testing.assert_array_equal(by_source["png/gray16.png"]["png"], GRAY16)
    assert by_source["dicom/series/6154"]["json"]["inverted"] is True


def test_other_settings_are_refused_fresh_replaces_and_a_rerun_rewrites_nothing(xray_folder, tmp_path):
    out = tmp_path / "shards"
    write_xray_shards(str(xray_folder), str(out), samples_per_shard=1, progress=False)
    assert len([n for n in os.listdir(out) if n.endswith(".tar")]) == 5
    with pytest.raises(BadInputError, match="samples_per_shard: 1 there, 3 now.*--fresh") as info:
        write_xray_shards(str(xray_folder), str(out), samples_per_shard=3, progress=False)
    assert info.value.where == str(out)
    first = write_xray_shards(str(xray_folder), str(out), samples_per_shard=3, progress=False, fresh=True)
    assert sorted(os.listdir(out)) == [".convert", "manifest.json", "xray-000000.tar", "xray-000001.tar"]
    shard_stat = os.stat(out / "xray-000000.tar")
    second = write_xray_shards(str(xray_folder), str(out), samples_per_shard=3, progress=False)
    assert first == second and os.stat(out / "xray-000000.tar").st_mtime_ns == shard_stat.st_mtime_ns


def test_missing_source_raises_naming_it(tmp_path):
    with pytest.raises(BadInputError) as info:
        write_xray_shards(str(tmp_path / "absent"), str(tmp_path / "out"), progress=False)
    assert info.value.where == str(tmp_path / "absent")


def test_source_without_usable_files_raises_and_leaves_no_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.dcm").write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match="no usable xray data") as info:
        write_xray_shards(str(src), str(out), progress=False)
    assert info.value.where == str(src)
    assert os.listdir(out) == [".convert"]  # the plan and the part's record (a rerun says the same at once)


def test_sample_keys_have_no_dots_and_differ_per_folder():
    first, second = sample_key("a/1.2.840.113619.dcm"), sample_key("b/1.2.840.113619.dcm")
    assert first.startswith("1_2_840_113619_") and "." not in first and first != second


def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(BadInputError, match="manifest not found"):
        load_manifest(str(tmp_path))
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(BadInputError, match="cannot read manifest") as info:
        load_manifest(str(path))
    assert info.value.where == str(path)
    manifest = {
        "modality": "xray", "format_version": 1, "shards": [{"name": "xray-000000.tar", "samples": 3}],
        "total_samples": 4, "skipped": [], "source": "src",
    }
    path.write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="total_samples"):
        load_manifest(str(tmp_path))
    del manifest["shards"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="missing"):
        load_manifest(str(tmp_path))


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions and holds no pixel data (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_tile_folders_become_pathology_shards_with_slide_ids_and_coordinates(tmp_path):
    src = make_tile_folder(str(tmp_path / "tiles"), 2, 3)
    (tmp_path / "tiles" / "slide_00" / "cut.jpg").write_bytes(
        (tmp_path / "tiles" / "slide_00" / "tile_x0_y0.jpg").read_bytes()[:200])
    (tmp_path / "tiles" / "slide_01" / "bomb.png").write_bytes(huge_png_header(40000, 40000))
    manifest = write_tile_shards(src, str(tmp_path / "out"), samples_per_shard=4, progress=False)
    assert manifest["modality"] == "pathology" and manifest["total_samples"] == 6
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {"slide_00/cut.jpg", "slide_01/bomb.png"}
    assert "decompression bomb" in reasons["slide_01/bomb.png"]
    samples = {}
    for shard in sorted((tmp_path / "out").glob("pathology-*.tar")):
        samples.update(read_shard(shard))
    first = decode_sample(next(s for s in samples.values() if b"slide_01" in s["json"]))
    assert first["jpg"].shape == (48, 48, 3) and first["jpg"].dtype == np.uint8
    assert first["json"]["slide_id"] == "slide_01" and first["json"]["y"] == 48
    original = (tmp_path / "tiles" / "slide_00" / "tile_x48_y0.jpg").read_bytes()
    assert any(s["jpg"] == original for s in samples.values())  # bytes kept, not re-encoded
