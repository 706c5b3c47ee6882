"""The bad-input corpus: every kind of broken file or sample is skipped with a named, counted warning.

Two places meet bad input. Shard writers meet source files (a NIfTI with a bad header, a corrupt
DICOM, a series with missing slices, a NaN volume, an empty or undecodable video, a zero-size
image, a decompression bomb): each is left out and listed in manifest.json with its reason. The
stream meets bad samples inside shards (the same faults, plus a truncated tar and a sample missing
a field): each is skipped, counted in the stream position and logged with shard, key and reason;
a run on such shards goes on and logs the count to MLflow.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pydicom
import pytest
import webdataset

from data_pipeline.ct_io import encode_npy
from data_pipeline.writers import write_ct_shards
from data_pipeline.synthetic import write_nifti, write_video
from data_pipeline.writers import write_video_shards
from data_pipeline.writers import write_tile_shards
from tests.conftest import TINY, metric_history, run_pretrain
from tests.test_modalities import GAPPED_SERIES
from tests.test_write_shards import huge_png_header

CT_SMALL = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm")


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width), 30000, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


# Source files -> shard writers ---------------------------------------------------------------------

def test_shard_writers_list_every_bad_source_file_with_its_reason(tmp_path):
    ct = tmp_path / "ct"
    ct.mkdir()
    write_nifti(str(ct / "good.nii.gz"))
    (ct / "bad_header.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 40)  # gzip magic, broken stream
    (ct / "not_nifti.nii").write_bytes(b"\x00" * 200)
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), str(ct / "nan.nii.gz"))
    shutil.copytree(GAPPED_SERIES, ct / "gapped")
    data = open(CT_SMALL, "rb").read()
    (ct / "corrupt.dcm").write_bytes(data[:300])
    manifest = write_ct_shards(str(ct), str(tmp_path / "ct_out"), progress=False)
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert manifest["total_samples"] == 1
    assert "not a readable NIfTI" in reasons["bad_header.nii.gz"] and "not a readable NIfTI" in reasons["not_nifti.nii"]
    assert "non-finite" in reasons["nan.nii.gz"] and "corrupt DICOM" in reasons["corrupt.dcm"]
    assert any(name.startswith("gapped/series-") and "missing slices" in why for name, why in reasons.items())

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(str(videos / "good.mp4"), frames=12)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "garbage.mp4").write_bytes(os.urandom(4096))
    (videos / "cut.mp4").write_bytes((videos / "good.mp4").read_bytes()[:200])
    manifest = write_video_shards(str(videos), str(tmp_path / "video_out"), progress=False)
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert manifest["total_samples"] == 1 and set(reasons) == {"empty.mp4", "garbage.mp4", "cut.mp4"}
    assert "empty video" in reasons["empty.mp4"]

    tiles = tmp_path / "tiles" / "slide"
    tiles.mkdir(parents=True)
    (tiles / "good.png").write_bytes(png_bytes(16, 16))
    (tiles / "zero.png").write_bytes(huge_png_header(0, 0))
    (tiles / "bomb.png").write_bytes(huge_png_header(60000, 60000))
    manifest = write_tile_shards(str(tmp_path / "tiles"), str(tmp_path / "tile_out"), progress=False)
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {"slide/zero.png", "slide/bomb.png"} and "decompression bomb" in reasons["slide/bomb.png"]


# Samples inside shards -> the stream -----------------------------------------------------------------

def corpus_shards(root, xray_src) -> dict:
    """Shards whose first samples are broken, followed by good ones: {modality: (shard folder, bad count)}."""
    out = {}
    good = [webdataset.WebDataset(str(xray_src), shardshuffle=False)]
    os.makedirs(root / "xray")
    with webdataset.TarWriter(str(root / "xray" / "xray-000000.tar")) as writer:
        writer.write({"__key__": "bomb", "png": huge_png_header(60000, 60000), "json": b"{}"})
        writer.write({"__key__": "zero_size", "png": huge_png_header(0, 0), "json": b"{}"})
        writer.write({"__key__": "not_png", "png": b"\x89PNG garbage", "json": b"{}"})
        writer.write({"__key__": "no_image", "json": b"{}"})  # the image field is missing
        for sample in good[0]:
            writer.write({"__key__": sample["__key__"], "png": sample["png"], "json": sample["json"]})
    out["xray"] = (str(root / "xray" / "xray-000000.tar"), 4)
    os.makedirs(root / "ct")
    volume = np.full((6, 16, 16), 40, np.int16)
    spacing = json.dumps({"spacing": [2.0, 1.0, 1.0]}).encode()
    with webdataset.TarWriter(str(root / "ct" / "ct-000000.tar")) as writer:
        writer.write({"__key__": "nan", "npy": encode_npy(np.full((6, 16, 16), np.nan, np.float32)),
                      "json": spacing})
        writer.write({"__key__": "no_spacing", "npy": encode_npy(volume), "json": b"{}"})
        writer.write({"__key__": "cut_npy", "npy": encode_npy(volume)[:100], "json": spacing})
        writer.write({"__key__": "no_volume", "json": spacing})
        for index in range(4):
            writer.write({"__key__": f"good{index}", "npy": encode_npy(volume), "json": spacing})
    out["ct"] = (str(root / "ct" / "ct-000000.tar"), 4)
    os.makedirs(root / "video")
    write_video(str(root / "clip.mp4"), frames=12)
    clip = (root / "clip.mp4").read_bytes()
    meta = json.dumps({"frames": 12, "fps": 25.0}).encode()
    with webdataset.TarWriter(str(root / "video" / "video-000000.tar")) as writer:
        writer.write({"__key__": "empty", "mp4": b"", "json": meta})
        writer.write({"__key__": "garbage", "mp4": os.urandom(2048), "json": meta})
        writer.write({"__key__": "no_frames", "mp4": clip, "json": b"{}"})
        for index in range(4):
            writer.write({"__key__": f"good{index}", "mp4": clip, "json": meta})
    out["video"] = (str(root / "video" / "video-000000.tar"), 3)
    return out


@pytest.fixture(scope="module")
def corpus(xray_shards, tmp_path_factory):
    return corpus_shards(tmp_path_factory.mktemp("corpus"), os.path.join(xray_shards, "xray-000000.tar"))


@pytest.mark.parametrize("modality", ["xray", "ct", "video"])
def test_the_stream_skips_counts_and_names_every_bad_sample(corpus, modality, caplog):
    from data_pipeline.pipelines import build_loader
    from pretrain.config import load_config
    from pretrain.objectives.base import DataSpec

    shard, bad = corpus[modality]
    spec = {"xray": DataSpec("single", 32, 1), "ct": DataSpec("volume", 16, 1, depth=4),
            "video": DataSpec("clip", 32, 3, frames=4)}[modality]
    chans = spec.in_chans
    cfg = load_config(None, [f"data.shards={shard}", f"data.modality={modality}", "data.batch_size=2",
                             "data.shuffle_buffer=0", "data.shuffle_shards=false", f"model.in_chans={chans}",
                             f"data.transforms.mean={[0.5] * chans}", f"data.transforms.std={[0.25] * chans}"])
    loader, stream, _ = build_loader(cfg.data, spec, seed=0, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.pipelines"):
        batch = next(iter(loader))
    stream.state.advance(batch["__reader__"], batch["__cursor__"])
    assert stream.state.skipped == bad and len(batch["key"]) == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
    assert len(skipped) == bad and all(shard in message for message in skipped)  # the shard and key are named


@pytest.mark.slow
def test_a_run_on_bad_shards_goes_on_and_logs_the_counts(corpus, tmp_path):
    xray, ct = corpus["xray"], corpus["ct"]
    sources = (f"data.sources=[{{name: xr, shards: '{xray[0]}', modality: xray, weight: 2}},"
               f" {{name: vol, shards: '{ct[0]}', modality: ct, weight: 1, transforms: {{mean: [0.5, 0.5, 0.5],"
               " std: [0.25, 0.25, 0.25]}}]")
    run_pretrain(["train", *TINY, f"output_dir={tmp_path}", "name=bad", sources, "model.stems={ct: 3}",
                  "data.ct.slices=3", "data.batch_size=2", "data.shuffle_buffer=0", "data.shuffle_shards=false",
                  "train.steps=6", "checkpoint.every=0", "tracking.system_metrics=false"])
    # 6 steps at weights 2:1 consume the 8 good X-rays and the 4 good volumes: every bad sample was met
    assert metric_history(str(tmp_path / "bad"), "skipped_samples")[-1][1] == xray[1] + ct[1]
