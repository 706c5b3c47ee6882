"""Parity of the masking rules with the references, from given noise or seeds: counts, restore order, the
running-cell patterns and VideoMAE V2's targets. Each expected value is written from the reference's rule."""
from __future__ import annotations

import pytest
import torch

from pretrain.objectives.mae import visible_count
from pretrain.objectives.masking import (decoder_positions, random_mask, random_masking, running_cell,
                                         tube_mask)
from pretrain.objectives.videomae import tubelet_targets


@pytest.mark.parametrize("patches,ratio,kept", [(49, 0.9, 4), (196, 0.75, 49), (196, 0.9, 19), (64, 0.6, 25)])
def test_mae_keeps_the_truncated_count(patches, ratio, kept):
    """Mirrors mae models_mae.py MaskedAutoencoderViT.random_masking: len_keep = int(L * (1 - mask_ratio))."""
    assert visible_count(patches, ratio) == kept


def test_mae_masking_from_given_noise_keeps_the_lowest_and_restores_the_order():
    """Mirrors random_masking: ids_shuffle = argsort(noise), ids_restore = argsort(ids_shuffle), the first
    len_keep of the shuffle are kept, mask = 1 where removed, in the original token order."""
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7], [0.2, 0.8, 0.4, 0.6, 0.0]])
    ids_keep, ids_restore, mask = random_masking(noise, 2)
    assert ids_keep.tolist() == [[1, 3], [4, 0]]
    assert mask.tolist() == [[1, 0, 1, 0, 1], [0, 1, 1, 1, 0]]
    tokens = torch.arange(5.0)[None].expand(2, -1)
    shuffled = torch.gather(tokens, 1, torch.argsort(noise, dim=1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), tokens)  # unshuffling gives the original order


@pytest.mark.parametrize("grid,ratio,per_frame", [((4, 3, 5), 0.9, 13), ((8, 14, 14), 0.9, 176), ((2, 4, 4), 0.75, 12)])
def test_tube_masks_hide_the_truncated_count_in_every_frame(grid, ratio, per_frame):
    """Mirrors VideoMAEv2 dataset/masking_generator.py TubeMaskingGenerator: num_masks_per_frame =
    int(mask_ratio * h * w), the same spatial mask tiled over the frames."""
    t, h, w = grid
    mask = tube_mask(torch.arange(3), grid, ratio).reshape(3, t, h * w)
    assert (mask.sum(dim=2) == per_frame).all() and (mask == mask[:, :1]).all()


def test_random_3d_masks_hide_the_truncated_count():
    """Mirrors RandomMaskingGenerator: num_mask = int(mask_ratio * num_patches)."""
    assert (random_mask(torch.arange(3), 75, 0.9).sum(dim=1) == 67).all()  # int(67.5); round would give 68


def reference_cells(grid: tuple, ratio: float) -> set:
    """The reference's running-cell maps (RunningCellMaskingGenerator with its Cell queue), True = kept:
    queue = m ones (dropped) then 4 - m zeros, m = int(4 * ratio); for pointer start p in 0..3, frame k reads
    the queue from position p + k + 1 (the pointer runs before each read), laid out row-major in a 2 x 2
    cell and tiled over the plane."""
    t, h, w = grid
    m = int(4 * ratio)
    queue = [1] * m + [0] * (4 - m)
    maps = set()
    for p in range(4):
        frames = []
        for k in range(t):
            cell = [queue[(i + p + k + 1) % 4] for i in range(4)]
            frames += [cell[2 * (r % 2) + (c % 2)] == 0 for r in range(h) for c in range(w)]
        maps.add(tuple(frames))
    return maps


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_running_cell_patterns_are_the_reference_generators(ratio):
    grid = (5, 4, 6)
    ours = {tuple(running_cell(grid, ratio, offset).tolist()) for offset in range(4)}
    assert ours == reference_cells(grid, ratio)


def test_the_decoder_decodes_every_kept_cell_and_the_loss_scores_the_hidden_ones():
    """Mirrors engine_for_pretraining.py: labels at ~decode_masked_pos (the kept cells, visible ones included),
    loss mask bool_masked_pos[~decode_masked_pos]; with no decoder masking, decode_masked_pos = ~mask."""
    seeds, grid = torch.arange(6), (4, 4, 4)
    mask = tube_mask(seeds, grid, 0.9)
    decoded, scored = decoder_positions(mask, seeds, grid, 0.5)
    cells = reference_cells(grid, 0.5)
    assert all(tuple(row.tolist()) in cells for row in decoded)
    assert (decoded & ~mask).any()  # visible positions get a mask token too
    assert torch.equal(scored, decoded & mask)
    plain, plain_scored = decoder_positions(mask, seeds, grid, 0.0)
    assert torch.equal(plain, mask) and torch.equal(plain_scored, mask)


def test_videomae_targets_are_normalised_per_channel_over_the_tubelet():
    """Mirrors train_one_epoch's normlize_target: rearrange to [B, N, t*p*p, C], subtract the mean over the
    pixels, divide by the unbiased std + 1e-6, flatten (pixels, channels) channel last."""
    torch.manual_seed(0)
    tubelets = torch.rand(2, 3, 2 * 4 * 4 * 3) * torch.tensor([1.0, 5.0, 0.2]).repeat(32)  # channel last
    expected = torch.empty_like(tubelets)
    for b in range(2):
        for n in range(3):
            for c in range(3):
                values = tubelets[b, n, c::3]
                mean = values.sum() / values.numel()
                std = (((values - mean) ** 2).sum() / (values.numel() - 1)).sqrt()
                expected[b, n, c::3] = (values - mean) / (std + 1e-6)
    torch.testing.assert_close(tubelet_targets(tubelets, 3, "channel"), expected, rtol=1e-5, atol=1e-5)
    joint = tubelet_targets(tubelets, 3, "tubelet")
    assert (joint - expected).abs().max() > 0.5  # the joint option is another target on RGB
    single = tubelets[..., ::3]
    torch.testing.assert_close(tubelet_targets(single, 1, "channel"),
                               (single - single.mean(-1, keepdim=True)) / (single.std(-1, keepdim=True) + 1e-6))
