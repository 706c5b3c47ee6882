"""CT volumes, whole-slide images and video: shard writers, transforms and streams on small real inputs."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pydicom
import pytest
import torch

from data_pipeline.ct_io import ct_sources, read_ct, read_nifti
from data_pipeline.writers import write_ct_shards
from data_pipeline.pipelines import build_loader
from data_pipeline.synthetic import write_nifti, write_slide, write_video
from data_pipeline.video_io import decode_frames, frame_indices, probe_video, reencode
from data_pipeline.writers import write_video_shards
from data_pipeline.volume import VolumeSampler, apply_windows, resample_box, resampled_shape
from data_pipeline.wsi_io import otsu_threshold
from data_pipeline.writers import write_wsi_shards
from data_pipeline.xray_io import hash_identifier
from pretrain.config import CTConfig, load_config
from pretrain.main import main
from pretrain.objectives.base import DataSpec

DICOM_TESTS = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "dicomdirtests")
CT_SERIES = os.path.join(DICOM_TESTS, "98892001", "CT5N")  # 5 real axial CT slices, 2.5 mm apart
GAPPED_SERIES = os.path.join(DICOM_TESTS, "77654033", "CT2")  # 4 real slices, one 202 mm away


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("ct_src")
    shutil.copytree(CT_SERIES, src / "patient1" / "CT5N")
    shutil.copytree(GAPPED_SERIES, src / "patient2" / "CT2")
    for index in range(3):
        write_nifti(str(src / f"synthetic_{index}.nii.gz"), seed=index)
    return str(src)


def loader_batch(shards, modality, spec, **data):
    overrides = [f"data.shards={shards}", f"data.modality={modality}", "data.batch_size=2",
                 f"model.in_chans={spec.in_chans}", f"data.transforms.mean={[0.5] * spec.in_chans}",
                 f"data.transforms.std={[0.25] * spec.in_chans}"] + [f"data.{k}={v}" for k, v in data.items()]
    cfg = load_config(None, overrides)
    loader, stream, _ = build_loader(cfg.data, spec, seed=0, rank=0, world_size=1)
    return next(iter(loader))


# CT ------------------------------------------------------------------------------------------------

def test_dicom_series_becomes_sorted_hounsfield_volume():
    paths = sorted(os.path.join(CT_SERIES, name) for name in os.listdir(CT_SERIES))
    volume, meta = read_ct(("dicom", paths[::-1]), "CT5N")  # file order must not matter
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    # axial slices with rows along +x (patient left) and columns along +y (posterior): already LPS [z, y, x]
    assert volume.dtype == np.int16 and volume.shape == (5, 16, 16)
    np.testing.assert_array_equal(volume, expected.astype(np.int16))
    assert meta["spacing"] == pytest.approx([2.5, 0.488281, 0.488281], rel=1e-4)
    assert meta["patient_id_hash"] == hash_identifier(datasets[0].PatientID)
    assert meta["series_id_hash"] == hash_identifier(datasets[0].SeriesInstanceUID)
    assert str(datasets[0].PatientID) not in json.dumps(meta)


def test_nifti_is_reoriented_from_its_affine(tmp_path):
    import nibabel as nib

    write_nifti(str(tmp_path / "a.nii.gz"), shape=(6, 8, 10), spacing=(3.0, 1.0, 0.5))
    reference, meta = read_nifti(str(tmp_path / "a.nii.gz"))
    img = nib.load(str(tmp_path / "a.nii.gz"))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])  # the same scan stored with x running the other way
    flip[0, 3] = (img.shape[0] - 1) * 0.5
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip)
    nib.save(flipped, str(tmp_path / "b.nii.gz"))
    again, meta_b = read_nifti(str(tmp_path / "b.nii.gz"))
    np.testing.assert_array_equal(reference, again)
    assert meta["spacing"] == meta_b["spacing"] == pytest.approx([3.0, 1.0, 0.5])
    # RAS storage -> LPS arrays: x and y reversed, z kept
    np.testing.assert_array_equal(reference, np.asarray(img.dataobj).transpose(2, 1, 0)[:, ::-1, ::-1])


def test_ct_shards_keep_volumes_losslessly_and_list_bad_series(ct_folder, tmp_path):
    manifest = write_ct_shards(ct_folder, str(tmp_path / "out"), samples_per_shard=2, progress=False)
    assert manifest["total_samples"] == 4  # 3 NIfTI + the 5-slice series
    (skipped,) = manifest["skipped"]
    assert skipped["file"].startswith("patient2/CT2/series-") and "missing slices" in skipped["reason"]
    with tarfile.open(tmp_path / "out" / "ct-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile([n for n in names if n.endswith(".json")][0]).read())
        stored = np.load(io.BytesIO(tar.extractfile([n for n in names if n.endswith(".npy")][0]).read()))
    volume, _ = read_ct(dict(ct_sources(ct_folder))[meta["source"]], meta["source"])
    np.testing.assert_array_equal(stored, volume)
    assert meta["shape"] == list(volume.shape) and len(meta["spacing"]) == 3


def test_resampling_windows_and_crops():
    volume = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(4, 6, 8)
    same = resample_box(volume, (2.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0, 0, 0), (4, 6, 8), air_hu=-1024)
    torch.testing.assert_close(same, volume)
    halved = resample_box(volume, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (0, 0, 0), (2, 3, 4), air_hu=-1024)
    torch.testing.assert_close(halved, volume[::2, ::2, ::2])
    assert resampled_shape((4, 6, 8), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (2, 3, 4)
    padded = resample_box(volume, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (-1, 0, 0), (6, 6, 8), air_hu=-1024)
    assert torch.allclose(padded[0], torch.tensor(-1024.0), atol=1e-2)  # air outside the volume
    assert torch.allclose(padded[-1], torch.tensor(-1024.0), atol=1e-2)
    torch.testing.assert_close(padded[1:5], volume)
    offset = resample_box(volume.numpy(), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (2, 1, 3), (2, 4, 4), air_hu=-1024)
    torch.testing.assert_close(offset, volume[2:4, 1:5, 3:7])  # a box inside reads only its own voxels
    windows = apply_windows(torch.tensor([-1000.0, 40.0, 240.0, 1000.0]), [(40, 400), (-600, 1500)])
    torch.testing.assert_close(windows[0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(windows[1], torch.tensor([350 / 1500, 1390 / 1500, 1.0, 1.0]))
    sampler = VolumeSampler(CTConfig(target_spacing=[1.0, 1.0, 1.0], windows=[[40, 400], [-600, 1500]], slices=3))
    meta, gen = {"spacing": [2.0, 1.0, 1.0]}, torch.Generator().manual_seed(0)
    hu = np.full((5, 12, 10), 40, np.int16)
    assert sampler.slab(hu, meta, gen, "x").shape == (6, 12, 10)
    crop = sampler.crop(hu, meta, (4, 8, 8), gen, "x")
    assert crop.shape == (2, 4, 8, 8) and torch.allclose(crop[0], torch.tensor(0.5))


def test_ct_streams_as_slabs_and_as_volumes(ct_folder, tmp_path):
    write_ct_shards(ct_folder, str(tmp_path / "out"), samples_per_shard=2, progress=False)
    batch = loader_batch(tmp_path / "out", "ct", DataSpec("single", 32, 3))
    assert batch["image"].shape == (2, 3, 32, 32) and torch.isfinite(batch["image"]).all()
    batch = loader_batch(tmp_path / "out", "ct", DataSpec("volume", 16, 2, depth=8),
                         **{"ct.windows": "[[40,400],[-600,1500]]"})
    assert batch["volume"].shape == (2, 2, 8, 16, 16)
    with pytest.raises(ValueError, match="CT gives 3 channel"):
        loader_batch(tmp_path / "out", "ct", DataSpec("single", 32, 1))


# Pathology slides ------------------------------------------------------------------------------------

def test_otsu_threshold_maximises_the_between_class_variance():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.6, 0.05, 2000)]).clip(0, 1)

    def between(t):  # straight from the definition: w0 * w1 * (mean0 - mean1)^2
        below = values < t
        if below.all() or not below.any():
            return 0.0
        return below.mean() * (1 - below.mean()) * (values[below].mean() - values[~below].mean()) ** 2

    candidates = np.linspace(0, 1, 257)[1:-1]
    best = candidates[np.argmax([between(t) for t in candidates])]
    assert otsu_threshold(values) == pytest.approx(best, abs=1 / 256)
    assert 0.15 < otsu_threshold(values) < 0.5


def test_slides_are_tiled_at_the_requested_mpp_on_tissue_only(tmp_path):
    (tmp_path / "slides" / "case1").mkdir(parents=True)
    write_slide(str(tmp_path / "slides" / "case1" / "s1.tif"), mpp=0.25, seed=1)
    write_slide(str(tmp_path / "slides" / "coarse.tif"), mpp=2.0, seed=2)
    (tmp_path / "slides" / "broken.svs").write_bytes(b"not a slide" * 20)
    code = main(["shards", "wsi", str(tmp_path / "slides"), str(tmp_path / "out"), "--mpp", "0.5",
                 "--tile-size", "64", "--min-tissue", "0.6", "--no-progress"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(reasons) == {"coarse.tif", "broken.svs"} and "coarser" in reasons["coarse.tif"]
    grid = (1024 * 0.25 // 32) * (768 * 0.25 // 32)  # 64-px tiles at 0.5 um/px over a 1024x768 slide at 0.25
    assert 0 < manifest["total_samples"] < grid  # the white glass is left out
    with tarfile.open(tmp_path / "out" / "pathology-000000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert all(m["tissue_fraction"] >= 0.6 and m["level"] == 1 and m["slide_id"] == "case1/s1" for m in metas)
    batch = loader_batch(tmp_path / "out", "pathology", DataSpec("single", 32, 3))
    assert batch["image"].shape == (2, 3, 32, 32)


# Video --------------------------------------------------------------------------------------------------

def counting_clip(path, frames=60):
    """A clip whose frame n is a flat grey of brightness 4n: decoded values tell the frame number."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for number in range(frames):
            image = np.full((32, 32, 3), 4 * number, np.uint8)
            for packet in stream.encode(__import__("av").VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frames_are_decoded_by_number_after_seeking(tmp_path):
    counting_clip(str(tmp_path / "count.mp4"))
    data = (tmp_path / "count.mp4").read_bytes()
    assert probe_video(data, "count.mp4")["frames"] == 60
    for wanted in ([0, 4, 8], [41, 45, 49, 53], [59]):
        frames = decode_frames(data, wanted, "count.mp4")
        np.testing.assert_allclose(frames[:, 16, 16, 0], [4 * n for n in wanted], atol=3)
    gen = torch.Generator().manual_seed(0)
    stride = frame_indices(60, 8, 4, "stride", gen)
    assert np.all(np.diff(stride) == 4) and 0 <= stride[0] and stride[-1] < 60
    segment = frame_indices(60, 6, 4, "segment", gen)
    assert [n // 10 for n in segment] == list(range(6))
    assert frame_indices(5, 4, 4, "stride", gen) == [0, 4, 4, 4]


def test_video_shards_bound_resolution_and_stream_clips(tmp_path):
    (tmp_path / "videos").mkdir()
    for index in range(3):
        write_video(str(tmp_path / "videos" / f"clip{index}.mp4"), frames=40, width=160, height=96, seed=index)
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    manifest = write_video_shards(str(tmp_path / "videos"), str(tmp_path / "out"), progress=False, max_side=64)
    assert manifest["total_samples"] == 3 and manifest["skipped"][0]["file"] == "empty.mp4"
    with tarfile.open(tmp_path / "out" / "video-000000.tar") as tar:
        meta = json.loads(tar.extractfile([n for n in tar.getnames() if n.endswith(".json")][0]).read())
    assert (meta["width"], meta["height"], meta["frames"], meta["fps"]) == (64, 38, 40, 25.0)
    assert len(reencode((tmp_path / "videos" / "clip0.mp4").read_bytes(), 32, "clip0")) > 0
    batch = loader_batch(tmp_path / "out", "video", DataSpec("clip", 32, 3, frames=8), **{"video.stride": 2})
    assert batch["clip"].shape == (2, 3, 8, 32, 32)


def test_a_reencode_is_the_same_bytes_every_time(tmp_path):
    """libx264's AVX-512 kernels gave about 1 in 4 re-encodes of this clip other bytes (x264_options leaves them out)."""
    write_video(str(tmp_path / "clip.mp4"), frames=120, seed=0)
    data = (tmp_path / "clip.mp4").read_bytes()
    assert len({reencode(data, 48, "clip") for _ in range(8)}) == 1


def test_inspect_summarises_every_modality_and_draws_a_contact_sheet(ct_folder, tmp_path, capsys):
    from PIL import Image

    write_ct_shards(ct_folder, str(tmp_path / "ct"), samples_per_shard=2, progress=False)
    (tmp_path / "videos").mkdir()
    write_video(str(tmp_path / "videos" / "a.mp4"), frames=20)
    write_video_shards(str(tmp_path / "videos"), str(tmp_path / "video"), progress=False)
    (tmp_path / "slides").mkdir()
    write_slide(str(tmp_path / "slides" / "s.tif"))
    write_wsi_shards(str(tmp_path / "slides"), str(tmp_path / "tiles"), progress=False, tile_size=64)
    spec = ",".join(str(tmp_path / name) for name in ("ct", "video", "tiles"))
    assert main(["shards", "inspect", spec, "--sheet", str(tmp_path / "sheet.png"), "--samples", "6",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("contact sheet:")[0])
    assert set(report["modalities"]) == {"ct", "video", "pathology"} and not report["undecodable"]
    assert report["modalities"]["ct"]["count"] == 4
    assert report["modalities"]["ct"]["spacing"]["max"][0] == pytest.approx(2.5)
    assert report["modalities"]["video"]["fps"]["median"] == 25.0
    assert report["modalities"]["pathology"]["mpp"]["median"] == 0.5
    assert Image.open(tmp_path / "sheet.png").size == (4 * 128, 2 * (128 + 14))


def test_pathology_views_turn_by_multiples_of_90_degrees():
    from data_pipeline.transforms_2d import SingleView
    from pretrain.config import TransformConfig

    image = torch.rand(3, 40, 40)
    plain = SingleView(16, 3, TransformConfig(mean=[0.0] * 3, std=[1.0] * 3))
    turning = SingleView(16, 3, TransformConfig(mean=[0.0] * 3, std=[1.0] * 3, rotate90=True))
    turns = set()
    for seed in range(24):
        base = plain(image, torch.Generator().manual_seed(seed), "x")["image"]
        view = turning(image, torch.Generator().manual_seed(seed), "x")["image"]  # same crop, then a turn
        (k,) = [k for k in range(4) if torch.equal(view, torch.rot90(base, k, dims=(-2, -1)))]
        turns.add(k)
    assert turns == {0, 1, 2, 3}
