"""MAE masking, loss and objective."""
import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.models.patch_embed import patchify, unpatchify
from pretrain.objectives import build_objective
from pretrain.objectives.mae import masked_patch_loss
from pretrain.objectives.masking import noise_from_seeds, random_masking
from tests.conftest import TINY


def test_random_masking_keeps_the_lowest_noise_tokens():
    noise = torch.rand(3, 20)
    ids_keep, ids_restore, mask = random_masking(noise, keep=5)
    assert ids_keep.shape == (3, 5) and mask.sum(1).tolist() == [15.0] * 3
    for row in range(3):
        assert set(ids_keep[row].tolist()) == set(noise[row].argsort()[:5].tolist())
        assert (mask[row, ids_keep[row]] == 0).all()
    shuffled = torch.gather(torch.arange(20).expand(3, -1), 1, noise.argsort(1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(20).expand(3, -1))


def test_noise_depends_only_on_the_sample_seed():
    alone = noise_from_seeds(torch.tensor([7]), 16)
    in_batch = noise_from_seeds(torch.tensor([3, 7, 9]), 16)
    assert torch.equal(alone[0], in_batch[1])
    assert not torch.equal(in_batch[0], in_batch[1])


def test_patchify_round_trip_any_channels():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(unpatchify(patches, 8, 3, (2, 3)), images)


def test_loss_counts_masked_patches_only():
    target = torch.randn(2, 10, 12)
    mask = torch.zeros(2, 10)
    mask[:, :4] = 1
    pred = torch.randn(2, 10, 12)
    changed = pred.clone()
    changed[:, 4:] += 100.0  # visible patches: must not matter
    assert masked_patch_loss(pred, target, mask, True) == masked_patch_loss(changed, target, mask, True)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert masked_patch_loss(normed, target, mask, True) < 1e-6


@pytest.mark.parametrize("chans", [1, 3])
def test_objective_forward_backward_and_render(chans):
    cfg = load_config(None, TINY + [f"model.in_chans={chans}", f"data.transforms.mean={[0.5] * chans}",
                                    f"data.transforms.std={[0.25] * chans}", "objective.mae.mask_ratio=0.75"])
    objective = build_objective(cfg)
    model = objective.trainable()
    batch = {"image": torch.randn(4, chans, 32, 32), "seed": torch.arange(4)}
    out = objective(model, batch, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["visible_tokens"] == 4
    assert model.encoder.patch_embed.proj.weight.grad is not None
    image = objective.render(batch, out)["reconstruction"]
    assert image.dtype == np.uint8 and image.shape[:2] == (4 * 32, 3 * 32)
    assert objective.data_spec().in_chans == chans and objective.encoder() is model.encoder


def test_same_seeds_give_the_same_loss():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    objective = build_objective(cfg)
    batch = {"image": torch.randn(4, 1, 32, 32), "seed": torch.arange(4)}
    model = objective.trainable()
    assert objective(model, batch, 0).loss == objective(model, batch, 5).loss


def test_bf16_training_computes_pixel_targets_from_the_fp32_views(monkeypatch):
    """Only the model input is cast: the trainer moves views in fp32, the patch embedding casts them to its
    bf16 weights, and the norm-pix target is built from the fp32 pixels (a 16-bit X-ray's low bits, which
    bf16's 8-bit mantissa would drop, are in the target)."""
    from pretrain.objectives import mae
    from pretrain.trainer import views_to

    cfg = load_config(None, TINY + ["objective.mae.norm_pix_loss=true"])
    objective = build_objective(cfg)
    model = objective.trainable().to(torch.bfloat16)
    images = torch.from_numpy(np.random.default_rng(0).integers(30000, 30064, (2, 1, 32, 32))).float() / 65535
    batch = views_to({"image": images.clone(), "seed": torch.arange(2)}, torch.device("cpu"))
    assert batch["image"].dtype == torch.float32 and torch.equal(batch["image"], images)
    seen = {}

    def spy(pred, target, mask, norm):
        seen["target"] = target
        return masked_patch_loss(pred, target, mask, norm)

    monkeypatch.setattr(mae, "masked_patch_loss", spy)
    out = objective(model, batch, step=0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert seen["target"].dtype == torch.float32 and torch.equal(seen["target"], patchify(images, 8))
    assert not torch.equal(patchify(images.bfloat16().float(), 8), patchify(images, 8))  # what bf16 would give
