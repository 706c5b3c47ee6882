"""The dense probe in 3D: label volumes stored beside CT volumes (``pretrain shards ct --masks``), cropped and
resampled with the scan's evaluation view, tubelet classes by majority, mIoU during a 2-process CT run."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from data_pipeline.errors import BadInputError
from data_pipeline.masks import patch_labels
from data_pipeline.modalities import build_preparer
from data_pipeline.volume import VolumeSampler
from data_pipeline.volume_masks import fit_labels, read_label_volume, volume_mask_path
from pretrain.config import load_config
from tests.conftest import metric_history, run_pretrain, mask_shards
from tests.test_hiend import HIER_CT

CT_3D = [o for o in HIER_CT if not o.startswith("objective.videomae.decoder")] + ["data.ct.target_spacing=[1,1,1]"]


def sampler(spacing=(1.0, 1.0, 1.0), window=(100.0, 200.0)):
    cfg = load_config(None, CT_3D + [f"data.ct.target_spacing={list(spacing)}", f"data.ct.windows=[{list(window)}]"])
    return VolumeSampler(cfg.data.ct)


def test_labels_follow_the_centred_crop_and_the_resampling_of_their_scan():
    """A scan whose HU are 100 x its labels, windowed to [0, 200] HU: the evaluation crop reads 0.5 x the labels
    voxel for voxel, at the stored spacing and resampled to twice it (samples on voxels: trilinear = nearest)."""
    labels = np.random.default_rng(0).integers(0, 3, (12, 20, 18)).astype(np.uint8)
    scan = (labels.astype(np.int16) * 100)
    for target in ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)):
        meta = {"spacing": [1.0, 1.0, 1.0]}
        crop = sampler(target).crop(scan, meta, (4, 8, 6), None, "scan")
        ids = sampler(target).labels(labels, meta, (4, 8, 6), "labels")
        assert ids.shape == (4, 8, 6) and ids.dtype == torch.int64
        assert torch.allclose(crop[0] * 2, ids.float(), atol=1e-4)
    ids = sampler((1.0, 1.0, 1.0)).labels(labels, {"spacing": [1.0, 1.0, 1.0]}, (16, 8, 8), "labels")
    assert (ids[:2] == 0).all() and (ids[-2:] == 0).all()  # a crop deeper than the scan: background outside


def test_a_slab_view_takes_the_labels_of_its_middle_slice():
    labels = np.zeros((9, 10, 12), np.uint8)
    labels[4] = 2  # the middle level of 9 slices
    labels[3], labels[5] = 1, 1
    plane = sampler().labels(labels, {"spacing": [1.0, 1.0, 1.0]}, None, "labels")
    assert plane.shape == (10, 12) and (plane == 2).all()


def test_tubelet_classes_are_the_majority_of_their_voxels():
    masks = torch.zeros(1, 4, 4, 4, dtype=torch.int64)
    masks[0, :2, :2, :2] = 1  # first tubelet (2 x 2 x 2): all class 1
    masks[0, 2:, 2:, 2:] = 2
    masks[0, 2, 2, 2] = 0  # last tubelet: 7 of 8 voxels class 2
    assert patch_labels(masks, (2, 2, 2), 3)[0].tolist() == [[[1, 0], [0, 0]], [[0, 0], [0, 2]]]


def test_label_files_are_checked_against_their_scan(tmp_path):
    assert volume_mask_path("m", "a/b.nii.gz") == os.path.join("m", "a/b.nii.gz")
    assert volume_mask_path("m", "a/series-1.2.3") == os.path.join("m", "a/series-1.2.3.nii.gz")
    sample = {"json": json.dumps({"shape": [2, 3, 4], "spacing": [2.0, 1.0, 1.0]}).encode()}
    path = str(tmp_path / "l.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 3, 2), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    labels, spacing = read_label_volume(path)
    assert labels.shape == (2, 3, 4) and fit_labels(labels, spacing, sample, path) is labels
    with pytest.raises(BadInputError, match="l.nii.gz: labels are 2 x 3 x 4 voxels, the scan 2 x 4 x 4"):
        fit_labels(labels, spacing, {"json": json.dumps({"shape": [2, 4, 4], "spacing": [2, 1, 1]})}, path)
    with pytest.raises(BadInputError, match="l.nii.gz: label spacing .* is not the scan's"):
        fit_labels(labels, spacing, {"json": json.dumps({"shape": [2, 3, 4], "spacing": [1, 1, 1]})}, path)
    nib.save(nib.Nifti1Image(np.full((4, 3, 2), 0.5, np.float32), np.eye(4)), path)
    with pytest.raises(BadInputError, match="integer class ids 0..255"):
        read_label_volume(path)
    with pytest.raises(BadInputError, match="missing.nii.gz: label file not found"):
        read_label_volume(str(tmp_path / "missing.nii.gz"))


@pytest.fixture(scope="module")
def ct_segmentation(tmp_path_factory):
    """40 synthetic 16 x 32 x 32 CT volumes with ball / box labels as shards, true and shuffled labels (another
    volume's); one scan without labels and one with labels of another shape (both skipped, named)."""
    from data_pipeline.synthetic import write_ct_segmentation

    root = tmp_path_factory.mktemp("ct_segmentation")
    raw = root / "raw"
    for index in range(40):
        write_ct_segmentation(str(raw), index)
    scan = nib.load(str(raw / "volumes" / "ct_000.nii.gz"))
    nib.save(scan, str(raw / "volumes" / "no_labels.nii.gz"))
    nib.save(scan, str(raw / "volumes" / "small_labels.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(raw / "masks" / "small_labels.nii.gz"))
    return {"raw": str(raw), **mask_shards("ct", raw / "volumes", raw / "masks", root, 20)}


def test_scans_without_usable_labels_are_skipped_and_named(ct_segmentation):
    manifest = json.load(open(os.path.join(ct_segmentation["true"], "manifest.json")))
    assert manifest["total_samples"] == 40
    reasons = " ".join(str(entry) for entry in manifest["skipped"])
    assert "masks/no_labels.nii.gz: label file not found" in reasons
    assert "masks/small_labels.nii.gz: labels are 8 x 8 x 8 voxels, the scan 16 x 32 x 32" in reasons


def test_a_labelled_ct_set_gives_volume_masks_for_volumes_and_slice_masks_for_slabs(ct_segmentation):
    from data_pipeline.eval_sets import load_labelled_set
    from pretrain.objectives import build_objective

    slabs = ["data.modality=ct", "model.in_chans=3", "model.img_size=32", "data.transforms.mean=[0.5,0.5,0.5]",
             "data.transforms.std=[0.2,0.2,0.2]"]
    for overrides, shape in ((CT_3D, (16, 32, 32)), (slabs, (32, 32))):
        cfg = load_config(None, overrides + ["data.ct.target_spacing=[1,1,1]"])
        labelled = load_labelled_set(ct_segmentation["true"], build_preparer(cfg.data, build_objective(cfg)
                                                                             .data_spec()), 4)
        assert labelled.masks.shape == (4, *shape) and set(labelled.masks.unique().tolist()) == {0, 1, 2}
        assert (labelled.labels == -1).all()  # a mask-only set: no class labels


@pytest.mark.slow
@pytest.mark.parametrize("masks", ["true", "shuffled"])
def test_dense_probe_of_a_two_process_ct_run_is_high_only_with_true_labels(ct_segmentation, masks, tmp_path):
    run_pretrain(["train", "--nproc", "2", *CT_3D, f"output_dir={tmp_path}", "name=run",
                  f"data.shards={ct_segmentation['true']}", "data.split_by=sample", "data.num_workers=0",
                  "data.batch_size=2", "train.steps=2", "probe.every=2", f"probe.shards={ct_segmentation[masks]}",
                  "distributed.zero_stage=2", "tracking.system_metrics=false"])
    dense = metric_history(os.path.join(str(tmp_path), "run"), "probe_dense_miou")
    assert [step for step, _ in dense] == [0, 2]
    labels = np.stack([np.asarray(nib.load(os.path.join(ct_segmentation["raw"], "masks", name)).dataobj)
                       for name in sorted(os.listdir(os.path.join(ct_segmentation["raw"], "masks")))
                       if name.startswith("ct_")])
    background = float((labels == 0).mean())  # predicting background everywhere: mIoU = background / 3
    if masks == "true":
        assert min(v for _, v in dense) > 0.6
    else:
        assert max(v for _, v in dense) < background / 3 + 0.15
