"""VideoMAE V2: tubelet tokens, 3D positions, tube / running-cell masks, and the loss on the right positions."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.models.patch_embed import PatchEmbed3D, patchify_3d, unpatchify_3d
from pretrain.models.pos_embed import sincos_3d, split_3d
from pretrain.objectives import build_objective
from pretrain.objectives.masking import decoder_positions, random_mask, running_cell, tube_mask

TINY_VIDEO = ["objective.name=videomae", "data.modality=video", "model.size=tiny", "model.embed_dim=32",
              "model.depth=2", "model.num_heads=2", "model.img_size=32", "model.patch_size=8", "model.in_chans=3",
              "model.frames=8", "objective.videomae.decoder_dim=32", "objective.videomae.decoder_depth=1",
              "objective.videomae.decoder_heads=2", "data.transforms.mean=[0.5,0.5,0.5]",
              "data.transforms.std=[0.2,0.2,0.2]"]


def test_tubelets_follow_the_patch_embedding_token_order():
    clips = torch.randn(2, 3, 8, 16, 24)
    tubelets = patchify_3d(clips, 2, 8)
    assert tubelets.shape == (2, 4 * 2 * 3, 2 * 8 * 8 * 3)
    assert torch.equal(unpatchify_3d(tubelets, 2, 8, 3, (4, 2, 3)), clips)
    embed = PatchEmbed3D(2, 8, 3, 5)
    weight = embed.proj.weight.permute(0, 2, 3, 4, 1).reshape(5, -1)  # (t, p, q, c) like patchify_3d
    expected = tubelets @ weight.T + embed.proj.bias
    torch.testing.assert_close(embed(clips), expected, rtol=1e-5, atol=1e-5)


def test_3d_positions_are_separable_over_time_and_space():
    table = sincos_3d(64, 3, 2, 2).reshape(3, 4, 64)
    time_dim, _ = split_3d(64)
    assert torch.equal(table[0, :, time_dim:], table[2, :, time_dim:])  # frames share the spatial code
    assert torch.equal(table[1, 0, :time_dim], table[1, 3, :time_dim])  # positions share the time code
    assert len({tuple(row.tolist()) for row in table.reshape(12, 64)}) == 12


def test_tube_masks_repeat_over_time_at_the_ratio():
    mask = tube_mask(torch.arange(5), (4, 3, 5), 0.9).reshape(5, 4, 15)
    assert (mask == mask[:, :1]).all()  # the same spatial mask in every time step
    assert (mask[:, 0].sum(dim=1) == 13).all()  # int(0.9 * 15) = int(13.5): VideoMAE truncates (round gives 14)
    assert not torch.equal(mask[0], mask[1])  # per-sample masks
    volume = random_mask(torch.arange(3), 64, 0.75)
    assert (volume.sum(dim=1) == 48).all()


def test_running_cells_drop_half_of_every_cell_and_run_one_position_per_step():
    keep = running_cell((4, 4, 6), 0.5, offset=1).reshape(4, 4, 6)
    cells = keep.reshape(4, 2, 2, 3, 2).permute(0, 1, 3, 2, 4).reshape(4, 6, 4)  # [time, cell, position]
    assert (cells.sum(dim=-1) == 2).all()  # every cell keeps 2 of 4 in every step
    for step in range(3):  # the pattern of step k + 1 is that of step k moved by one position
        assert torch.equal(cells[step + 1], torch.roll(cells[step], -1, dims=-1))
    assert (keep.sum(dim=0) == 2).all()  # over 4 steps each position is kept twice
    assert running_cell((2, 2, 2), 0.0, 0).all()


def test_decoder_positions_are_a_running_cell_pattern_and_the_scored_ones_are_hidden():
    seeds = torch.arange(4)
    mask = tube_mask(seeds, (4, 4, 4), 0.75)
    decoded, scored = decoder_positions(mask, seeds, (4, 4, 4), 0.5)
    cells = [running_cell((4, 4, 4), 0.5, o) for o in range(4)]
    assert all(any(torch.equal(row, c) for c in cells) for row in decoded)  # visible positions included
    assert (decoded.sum(dim=1) == 32).all() and torch.equal(scored, decoded & mask)
    assert all(torch.equal(d, s) for d, s in zip(decoder_positions(mask, seeds, (4, 4, 4), 0.0), (mask, mask)))


def test_decoder_gets_a_mask_token_at_every_kept_cell_and_scores_the_hidden_ones():
    """Mirrors VideoMAEv2 models/modeling_pretrain.py PretrainVisionTransformer.forward and the loss of
    engine_for_pretraining.py train_one_epoch: decoder input = visible tokens + a mask token at every
    position the running cell keeps; targets normalised per channel over each tubelet's pixels
    (unbiased std + 1e-6); mean squared error averaged over the kept positions the encoder did not see."""
    cfg = load_config(None, TINY_VIDEO)
    objective = build_objective(cfg)
    model = objective.trainable()
    seen = {}
    model.decoder_blocks[0].register_forward_hook(lambda m, inputs, out: seen.update(tokens=inputs[0].shape[1]))
    clips = torch.randn(2, 3, 8, 32, 32)
    seeds = torch.tensor([3, 4])
    out = objective(model, {"clip": clips, "seed": seeds}, 0)
    mask, decoded_ids, scored = objective.masks(seeds)
    visible = int((~mask[0]).sum())
    assert visible == 4 * 2  # int(0.9 * 16) = 14 of 16 positions hidden in each of 4 time steps
    assert seen["tokens"] == 1 + visible + decoded_ids.shape[1] == 1 + 8 + 32
    assert out.metrics["decoded_tokens"] == 32 and out.metrics["visible_tokens"] == visible
    pred, total, count = out.visuals["pred"], 0.0, 0
    grid_h = grid_w = 4
    for b in range(2):
        for j, token in enumerate(decoded_ids[b].tolist()):
            if not mask[b, token]:
                assert not scored[b, j]
                continue
            t, rest = divmod(token, grid_h * grid_w)
            h, w = divmod(rest, grid_w)
            cube = clips[b, :, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8].reshape(3, -1)  # [C, pixels]
            cube = (cube - cube.mean(dim=1, keepdim=True)) / (cube.std(dim=1, unbiased=True, keepdim=True) + 1e-6)
            total += float(((pred[b, j] - cube.T.reshape(-1)) ** 2).mean())  # channel last within a tubelet
            count += 1
    assert count == int(scored.sum()) > 0
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_tubelet_target_norm_is_the_joint_option():
    cfg = load_config(None, TINY_VIDEO + ["objective.videomae.target_norm=tubelet"])
    objective = build_objective(cfg)
    clips, seeds = torch.randn(2, 3, 8, 32, 32), torch.tensor([3, 4])
    out = objective(objective.trainable(), {"clip": clips, "seed": seeds}, 0)
    _, decoded_ids, scored = objective.masks(seeds)
    b, j = [int(i) for i in scored.nonzero()[0]]
    token = int(decoded_ids[b, j])
    t, rest = divmod(token, 16)
    h, w = divmod(rest, 4)
    cube = clips[b, :, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8].permute(1, 2, 3, 0).reshape(-1)
    target = (cube - cube.mean()) / (cube.var() + 1e-6) ** 0.5
    assert out.visuals["pred"].shape[-1] == target.numel()
    with pytest.raises(ValueError, match="target_norm"):
        build_objective(load_config(None, TINY_VIDEO + ["objective.videomae.target_norm=pixel"]))


def test_running_cell_decoding_refuses_an_odd_token_plane():
    with pytest.raises(ValueError, match="even token plane"):
        build_objective(load_config(None, TINY_VIDEO + ["model.img_size=24"]))
    assert build_objective(load_config(None, TINY_VIDEO + ["model.img_size=24",
                                                           "objective.videomae.decoder_mask_ratio=0"]))


def test_volume_objective_masks_at_random_and_renders_a_strip():
    cfg = load_config(None, [o for o in TINY_VIDEO if not o.startswith(("data.modality", "model.in_chans",
                                                                          "data.transforms"))]
                      + ["data.modality=ct", "model.in_chans=1", "model.frames=16", "model.tubelet_size=4"])
    objective = build_objective(cfg)
    assert objective.masking == "random" and objective.data_spec().kind == "volume"
    batch = {"volume": torch.randn(2, 1, 16, 32, 32), "seed": torch.tensor([1, 2])}
    out = objective(objective.trainable(), batch, 0)
    assert out.loss.isfinite()
    strip = objective.render(batch, out)["reconstruction"]
    assert strip.shape == (4 * 32, 8 * 32)  # input / encoder view / scored / reconstruction x 8 slices
