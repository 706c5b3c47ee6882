"""The dense probe (issue 22 item 4): segmentation masks beside 2D images in labelled shards (`pretrain shards ...
--masks DIR`), patch classes, mean IoU, and probe_dense_miou logged during a 2-process run: near perfect with the
true masks, at chance with masks shuffled between images."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.errors import BadInputError
from data_pipeline.masks import evaluation_mask, fit_mask, patch_labels, read_mask
from pretrain.probes import dense_probe_miou, mean_iou
from tests.conftest import TINY, metric_history, run_pretrain, mask_shards


def test_mean_iou_is_the_mean_over_classes_of_intersection_over_union():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 0])
    # class 0: |{0,1}| / |{0,1,2,5}| = 2/4; class 1: |{3,4}| / |{2,3,4}| = 2/3; class 2: 0 / |{5}| = 0
    assert mean_iou(pred, target, 3) == pytest.approx((2 / 4 + 2 / 3 + 0) / 3)
    assert mean_iou(target, target, 5) == 1.0  # classes neither holds do not count


def test_each_patch_takes_the_class_most_of_its_pixels_hold():
    masks = torch.zeros(1, 4, 4, dtype=torch.int64)
    masks[0, :2, :2] = torch.tensor([[1, 1], [1, 0]])  # 3 of 4 pixels: class 1
    masks[0, 2:, 2:] = torch.tensor([[2, 2], [1, 1]])  # a tie: the lower class
    assert patch_labels(masks, 2, 3).tolist() == [[[1, 0], [0, 1]]]


def test_the_mask_follows_the_evaluation_resize_and_the_stored_image_size(tmp_path):
    mask = np.zeros((8, 6), np.uint8)
    mask[:4] = 3
    assert evaluation_mask(mask, 4).tolist() == [[3] * 4] * 2 + [[0] * 4] * 2
    sample = {"json": json.dumps({"height": 4, "width": 3, "resized_from": [8, 6]}).encode()}
    assert fit_mask(mask, sample, "m.png").shape == (4, 3)  # the source's size: resized with the image
    with pytest.raises(BadInputError, match="m.png: mask is 5 x 6, the image 4 x 3"):
        fit_mask(np.zeros((5, 6), np.uint8), sample, "m.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(BadInputError, match="rgb.png: a mask must be an 8-bit gray or palette PNG"):
        read_mask(str(tmp_path / "rgb.png"))


def test_a_linear_probe_on_separable_patch_features_segments_them():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (40, 16))
    features = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(40, 16, 3)
    assert dense_probe_miou(features[:20], labels[:20], features[20:], labels[20:], 50, 10_000) > 0.95
    assert dense_probe_miou(features[:20], labels[:20], features[20:], labels[20:].roll(1, 0), 50, 10_000) < 0.5


@pytest.fixture(scope="module")
def segmentation_shards(tmp_path_factory):
    """100 synthetic 64 px images with disc / square masks as labelled shards: true and shuffled masks (another
    image's), one source without a mask and one with a mask of the wrong size (both skipped, named)."""
    from data_pipeline.synthetic import write_segmentation

    root = tmp_path_factory.mktemp("segmentation")
    for index in range(100):
        write_segmentation(str(root / "raw"), index)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "raw" / "images" / "no_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "raw" / "images" / "small_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "raw" / "masks" / "small_mask.png")
    return mask_shards("xray", root / "raw" / "images", root / "raw" / "masks", root, 50)


def test_sources_without_a_usable_mask_are_skipped_and_named(segmentation_shards):
    manifest = json.load(open(os.path.join(segmentation_shards["true"], "manifest.json")))
    assert manifest["total_samples"] == 100
    reasons = " ".join(str(entry) for entry in manifest["skipped"])
    assert "masks/no_mask.png: mask file not found" in reasons
    assert "masks/small_mask.png: mask is 32 x 32, the image 64 x 64" in reasons


@pytest.mark.slow
@pytest.mark.parametrize("masks", ["true", "shuffled"])
def test_dense_probe_during_a_two_process_run_is_near_perfect_only_with_true_masks(segmentation_shards, masks,
                                                                                   tmp_path):
    shards = segmentation_shards[masks]
    run_pretrain(["train", "--nproc", "2", *TINY, "model.img_size=64", f"output_dir={tmp_path}", "name=run",
                  f"data.shards={segmentation_shards['true']}", "data.split_by=sample", "data.num_workers=0",
                  "data.batch_size=4", "train.steps=4", "probe.every=2", f"probe.shards={shards}",
                  "distributed.zero_stage=2", "tracking.system_metrics=false"])
    dense = metric_history(os.path.join(str(tmp_path), "run"), "probe_dense_miou")
    assert [step for step, _ in dense] == [0, 2, 4]
    assert not metric_history(os.path.join(str(tmp_path), "run"), "probe_knn_acc")  # no class labels in the set
    mask = np.stack([np.asarray(Image.open(os.path.join(shards, "..", "..", "raw", "masks", name)))
                     for name in sorted(os.listdir(os.path.join(shards, "..", "..", "raw", "masks")))
                     if name.startswith("seg_")])
    background = float((mask == 0).mean())  # predicting background everywhere: mIoU = background / 3
    if masks == "true":
        assert min(v for _, v in dense) > 0.85
    else:
        assert max(v for _, v in dense) < background / 3 + 0.1
