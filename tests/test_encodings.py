"""``pretrain shards --encoding png|npy|jpeg`` and X-ray ``--max-side``: what is stored, that the loader reads it
as training would, that the manifest says what was chosen and that ``inspect`` shows bytes and decode time."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from pydicom.data import get_testdata_file

from data_pipeline.decoders import decode_sample, image_of
from data_pipeline.encodings import encode_image, fit_longer_side
from data_pipeline.inspect_shards import inspect_shards
from data_pipeline.synthetic import write_slide
from data_pipeline.transforms_2d import to_unit_tensor
from data_pipeline.writers import write_tile_shards, write_wsi_shards, write_xray_shards
from pretrain.main import main
from pretrain.objectives.base import DataSpec
from tests.conftest import make_tile_folder, make_xray_folder, synthetic_xray
from tests.test_modalities import loader_batch
from tests.test_write_shards import read_shard


def images(out) -> dict:
    """{source: (image field, decoded image, metadata)} of every sample in the shards of ``out``."""
    found = {}
    for shard in sorted(p for p in os.listdir(out) if p.endswith(".tar")):
        for raw in read_shard(os.path.join(out, shard)).values():
            sample = decode_sample(raw)
            field = next(name for name in raw if name not in ("json", "cls"))
            found[sample["json"]["source"]] = (field, image_of(sample, shard), sample["json"])
    return found


@pytest.fixture(scope="module")
def xray_sets(tmp_path_factory):
    """The same 6 X-rays (64-96 px) with --max-side 48 in each encoding: {encoding: output folder}."""
    root = tmp_path_factory.mktemp("encodings")
    src = make_xray_folder(str(root / "src"), 6)
    sets = {}
    for encoding in ("png", "npy", "jpeg"):
        sets[encoding] = str(root / encoding)
        write_xray_shards(src, sets[encoding], progress=False, max_side=48, encoding=encoding)
    return sets


def test_the_pre_resize_is_trainings_resampling_and_keeps_16_bits():
    image = synthetic_xray(np.random.default_rng(1), 200, 120)
    resized = fit_longer_side(image, 50)
    assert resized.dtype == np.uint16 and resized.shape == (50, 30)
    expected = TF.resize(to_unit_tensor(image, "x"), [50, 30], antialias=True)[0]
    assert (to_unit_tensor(resized, "x")[0] - expected).abs().max() <= 0.5 / 65535 + 1e-7
    assert len(np.unique(resized)) > 256  # more levels than 8 bits hold
    assert fit_longer_side(image, 200) is image and fit_longer_side(image, None) is image
    colour = np.random.default_rng(2).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    assert fit_longer_side(colour, 20).shape == (10, 20, 3) and fit_longer_side(colour, 20).dtype == np.uint8


def test_png_and_npy_hold_the_same_pixels_jpeg_close_and_the_manifest_says_which(xray_sets):
    found = {encoding: images(out) for encoding, out in xray_sets.items()}
    assert {field for field, _, _ in found["png"].values()} == {"png"}
    assert {field for field, _, _ in found["npy"].values()} == {"npy"}
    assert {field for field, _, _ in found["jpeg"].values()} == {"jpg"}
    for source, (_, png, meta) in found["png"].items():
        assert png.dtype == np.uint16 and max(png.shape) == 48 and max(meta["resized_from"]) > 48
        assert [meta["height"], meta["width"]] == list(png.shape)
        np.testing.assert_array_equal(found["npy"][source][1], png)
        jpeg = found["jpeg"][source][1]
        assert jpeg.dtype == np.uint8 and jpeg.shape == png.shape
        assert np.abs(jpeg / 255.0 - png / 65535.0).mean() < 3 / 255  # 2.1 / 255 here: lossy, and 5% noise
    for encoding, out in xray_sets.items():
        conversion = json.load(open(os.path.join(out, "manifest.json")))["conversion"]
        assert conversion["options"]["encoding"] == encoding and conversion["options"]["max_side"] == 48


def test_the_loader_gives_the_same_batch_from_png_and_npy_shards(xray_sets):
    spec = DataSpec("single", 32, 1)
    png, npy = (loader_batch(xray_sets[name], "xray", spec) for name in ("png", "npy"))
    assert torch.equal(png["image"], npy["image"]) and png["key"] == npy["key"]


def test_inspect_shows_bytes_and_decode_time_per_sample_and_how_the_shards_were_made(xray_sets, capsys):
    sizes = {}
    for encoding, out in xray_sets.items():
        report = inspect_shards(out)
        entry = report["modalities"]["xray"]
        assert entry["count"] == 6 and entry["decode_ms_per_sample"]["median"] > 0
        sizes[encoding] = entry["bytes_per_sample"]["median"]
        assert report["conversions"][0]["options"]["encoding"] == encoding
    assert sizes["jpeg"] < sizes["png"] and sizes["jpeg"] < sizes["npy"]
    assert main(["shards", "inspect", xray_sets["npy"], "--sheet", ""]) == 0
    printed = capsys.readouterr().out
    assert "converted as xray with max_side 48, encoding npy" in printed and "ms decode per sample" in printed


def test_a_resized_dicom_has_its_pixel_spacing_scaled(tmp_path):
    (tmp_path / "src").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src" / "ct.dcm")  # 128 x 128
    write_xray_shards(str(tmp_path / "src"), str(tmp_path / "full"), progress=False)
    write_xray_shards(str(tmp_path / "src"), str(tmp_path / "half"), progress=False, max_side=64)
    (_, full, before), = images(tmp_path / "full").values()
    (_, half, after), = images(tmp_path / "half").values()
    assert full.shape == (128, 128) and half.shape == (64, 64) and after["resized_from"] == [128, 128]
    assert after["pixel_spacing"] == pytest.approx([2 * value for value in before["pixel_spacing"]])


def test_slide_and_tile_encodings_store_the_same_pixels(tmp_path):
    (tmp_path / "slides").mkdir()
    write_slide(str(tmp_path / "slides" / "s.tif"))
    stored = {}
    for encoding in ("png", "npy"):
        write_wsi_shards(str(tmp_path / "slides"), str(tmp_path / encoding), progress=False, tile_size=64,
                         encoding=encoding)
        stored[encoding] = images(tmp_path / encoding)
    write_wsi_shards(str(tmp_path / "slides"), str(tmp_path / "jpeg"), progress=False, tile_size=64)
    default = images(tmp_path / "jpeg")
    assert {field for field, _, _ in default.values()} == {"jpg"}
    for source, (field, pixels, _) in stored["png"].items():
        assert field == "png" and pixels.shape == (64, 64, 3)
        np.testing.assert_array_equal(stored["npy"][source][1], pixels)
    tiles = make_tile_folder(str(tmp_path / "tiles"), 1, 3)
    write_tile_shards(tiles, str(tmp_path / "tiles_npy"), progress=False, encoding="npy")
    for source, (field, pixels, _) in images(tmp_path / "tiles_npy").items():
        original = decode_sample({"jpg": open(os.path.join(tiles, source), "rb").read()})["jpg"]
        assert field == "npy" and np.array_equal(pixels, original)


def test_an_unknown_encoding_is_refused_before_anything_is_written(tmp_path):
    src = make_xray_folder(str(tmp_path / "src"), 1)
    with pytest.raises(ValueError, match="unknown encoding 'webp'"):
        write_xray_shards(src, str(tmp_path / "out"), progress=False, encoding="webp")
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(SystemExit):
        main(["shards", "xray", src, str(tmp_path / "cli"), "--encoding", "webp"])
    assert not os.path.exists(tmp_path / "cli")
    with pytest.raises(ValueError, match="uint8 / uint16"):
        encode_image(np.zeros((4, 4), np.float32), "png")
