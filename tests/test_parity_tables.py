"""Parity of the fixed tables and the pixel targets with the references (MAE, VideoMAE V2), issue 17.

Expected values are written here from the equations and from reading facebookresearch/mae
(util/pos_embed.py, models_mae.py) and OpenGVLab/VideoMAEv2 (engine_for_pretraining.py), as explicit
float64 loops or plain reshape/permute; no reference code is called or copied.

Known differences from the references (see the docstrings):

* 2D sin-cos: MAE's get_2d_sincos_pos_embed meshes (w, h), so its first half encodes the COLUMN and the
  second the row; ours (sincos_2d) puts the row first. Same features, halves swapped; the table is a
  fixed, non-persistent buffer, so only a table copied in from an MAE checkpoint would notice.
* 3D: VideoMAE V2's get_sinusoid_encoding_table is a 1D table over the flattened token index with sin/cos
  interleaved (even / odd dims); ours (sincos_3d) is separable: [time code of dim//4//4*4 | 2D code].
* Norm-pix targets: masked_patch_loss (tested here) is MAE's rule, over all p*p*C values with
  (x - mean) / sqrt(var_unbiased + 1e-6). VideoMAE V2's own rule (per channel over the t*p*p pixels,
  (x - mean) / (std_unbiased + 1e-6)) is videomae.py's tubelet_targets, not covered here.
"""
import math

import numpy as np
import pytest
import torch

from pretrain.models.patch_embed import PatchEmbed2D, PatchEmbed3D, patchify, patchify_3d, unpatchify, unpatchify_3d
from pretrain.models.pos_embed import sincos_1d, sincos_2d, sincos_2d_mae, sincos_3d
from pretrain.objectives.mae import masked_patch_loss


def sincos_equation(dim, position):
    """One position's [sin(pos w_0) .. sin(pos w_{d/2-1}), cos(pos w_0) .. cos(pos w_{d/2-1})], w_i = 1/10000^(2i/d)
    (MAE util/pos_embed.py get_1d_sincos_pos_embed_from_grid)."""
    omegas = [1.0 / 10000 ** (2 * i / dim) for i in range(dim // 2)]
    return [math.sin(position * w) for w in omegas] + [math.cos(position * w) for w in omegas]


def mae_2d_table(dim, grid):
    """MAE's get_2d_sincos_pos_embed(dim, grid) from the equation: token n = r * grid + c (row-major);
    np.meshgrid(grid_w, grid_h) makes grid[0] the column, encoded in the FIRST half; the row in the second."""
    return np.array([sincos_equation(dim // 2, c) + sincos_equation(dim // 2, r)
                     for r in range(grid) for c in range(grid)])


# ----------------------------------------------------------------------------- positional tables

def test_sincos_1d_equals_the_equation():
    """mirrors MAE util/pos_embed.py get_1d_sincos_pos_embed_from_grid: [sin(p w) | cos(p w)], w_i = 1e4^(-2i/d)."""
    positions = [0.0, 1.0, 2.5, 7.0, 31.0, 200.0]
    for dim in (2, 8, 64):
        expected = np.array([sincos_equation(dim, p) for p in positions])
        got = sincos_1d(dim, torch.tensor(positions)).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        sincos_1d(7, torch.arange(3))


@pytest.mark.parametrize("dim,grid", [(16, 4), (64, 7), (32, 14)])
def test_sincos_2d_is_maes_table_with_the_halves_swapped(dim, grid):
    """mirrors MAE util/pos_embed.py get_2d_sincos_pos_embed(dim, grid) (no cls row): ours puts the row code in
    the first half, MAE the column code; swapping our halves gives MAE's table exactly, and sincos_2d_mae
    (pos_embed_mode sincos_mae) is MAE's table."""
    mae = mae_2d_table(dim, grid)
    ours = sincos_2d(dim, grid, grid).double().numpy()
    half = dim // 2
    np.testing.assert_allclose(np.concatenate([ours[:, half:], ours[:, :half]], axis=1), mae, rtol=0, atol=1e-6)
    assert not np.allclose(ours, mae, atol=1e-3)  # the difference is real: the halves are not symmetric
    np.testing.assert_allclose(sincos_2d_mae(dim, grid, grid).double().numpy(), mae, rtol=0, atol=1e-6)  # MAE layout


def test_sincos_2d_on_a_non_square_grid_is_row_major():
    """The equation on a rectangular grid (MAE handles square grids only): token r * W + c is
    [code(r) | code(c)] with each code of dim/2."""
    dim, rows, cols = 24, 3, 5
    expected = np.array([sincos_equation(dim // 2, r) + sincos_equation(dim // 2, c)
                         for r in range(rows) for c in range(cols)])
    np.testing.assert_allclose(sincos_2d(dim, rows, cols).double().numpy(), expected, rtol=0, atol=1e-6)


def test_sincos_3d_is_separable_time_then_space():
    """sincos_3d against its stated equation (the deliberate difference from VideoMAE V2's 1D
    get_sinusoid_encoding_table, in the module docstring): token (t, r, c) at index (t * H + r) * W + c is
    [code_dt(t) | code_ds/2(r) | code_ds/2(c)], dt = dim//4//4*4, ds = dim - dt."""
    for dim, (frames, rows, cols) in ((32, (2, 3, 4)), (40, (2, 2, 3)), (48, (4, 2, 2)), (96, (3, 2, 5))):
        dt = dim // 4 // 4 * 4
        ds = dim - dt
        expected = np.array([sincos_equation(dt, t) + sincos_equation(ds // 2, r) + sincos_equation(ds // 2, c)
                             for t in range(frames) for r in range(rows) for c in range(cols)])
        got = sincos_3d(dim, frames, rows, cols).double().numpy()
        assert got.shape == (frames * rows * cols, dim)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- patch order

@pytest.mark.parametrize("chans,height,width", [(1, 8, 8), (3, 8, 12), (3, 12, 8)])
def test_patchify_order_equals_maes(chans, height, width):
    """mirrors MAE models_mae.py MaskedAutoencoderViT.patchify/unpatchify ('nchpwq->nhwpqc'): patch
    n = h * W' + w, element (i * p + j) * C + c = image[c, h p + i, w p + j] (pixel-major, channel last)."""
    p = 4
    images = torch.randn(2, chans, height, width, dtype=torch.float64)
    expected = torch.zeros(2, (height // p) * (width // p), p * p * chans, dtype=torch.float64)
    for b in range(2):
        for h in range(height // p):
            for w in range(width // p):
                for i in range(p):
                    for j in range(p):
                        for c in range(chans):
                            pixel = images[b, c, h * p + i, w * p + j]
                            expected[b, h * (width // p) + w, (i * p + j) * chans + c] = pixel
    got = patchify(images, p)
    assert torch.equal(got, expected)
    assert torch.equal(unpatchify(expected, p, chans, (height // p, width // p)), images)


def test_patchify_matches_the_stem_token_order():
    """The target of token n (patchify) is the patch the stem embeds as token n (PatchEmbed2D, timm's
    proj conv + flatten(2).transpose(1, 2)): the conv equals a linear map of patchify's rows with the
    kernel laid out (p, q, c)."""
    stem = PatchEmbed2D(4, 3, 5).double()
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    kernel = stem.proj.weight.permute(0, 2, 3, 1).reshape(5, -1)  # [D, p*p*C] in (p, q, c) order
    expected = patchify(images, 4) @ kernel.t() + stem.proj.bias
    torch.testing.assert_close(stem(images), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chans", [1, 3])
def test_patchify_3d_equals_videomae_rearrange(chans):
    """mirrors VideoMAE V2 engine_for_pretraining.py's target rearrange
    'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)', written with reshape/permute; and the stem order."""
    tubelet, p = 2, 4
    clips = torch.randn(2, chans, 4, 8, 12, dtype=torch.float64)
    b, c, frames, height, width = clips.shape
    t, h, w = frames // tubelet, height // p, width // p
    x = clips.reshape(b, c, t, tubelet, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    expected = x.reshape(b, t * h * w, tubelet * p * p * c)
    assert torch.equal(patchify_3d(clips, tubelet, p), expected)
    assert torch.equal(unpatchify_3d(expected, tubelet, p, chans, (t, h, w)), clips)
    assert torch.equal(expected[1, (1 * h + 0) * w + 2, ((1 * p + 3) * p + 2) * c + (c - 1)],
                       clips[1, c - 1, 1 * tubelet + 1, 0 * p + 3, 2 * p + 2])  # one element by hand
    stem = PatchEmbed3D(tubelet, p, chans, 6).double()
    kernel = stem.proj.weight.permute(0, 2, 3, 4, 1).reshape(6, -1)  # [D, t*p*p*C] in (p0, p1, p2, c) order
    torch.testing.assert_close(stem(clips), expected @ kernel.t() + stem.proj.bias, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- MAE loss

def mae_forward_loss(images, pred, mask, p, norm_pix):
    """MAE models_mae.py forward_loss from the equation, with loops: target = patchify(images); with norm_pix
    each patch's p*p*C values become (x - mean) / sqrt(var_unbiased + 1e-6); per-patch mean squared error;
    sum(mask * loss) / sum(mask)."""
    b, chans, height, width = images.shape
    cols = width // p
    total, weight = 0.0, 0.0
    for n in range(b):
        for patch in range(pred.shape[1]):
            h, w = divmod(patch, cols)
            values = [images[n, c, h * p + i, w * p + j] for i in range(p) for j in range(p) for c in range(chans)]
            if norm_pix:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            error = sum((pred[n, patch, k] - values[k]) ** 2 for k in range(len(values))) / len(values)
            total += mask[n, patch] * error
            weight += mask[n, patch]
    return total / weight


@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_patch_loss_equals_maes_forward_loss(chans, norm_pix):
    """mirrors MAE models_mae.py MaskedAutoencoderViT.forward_loss (norm_pix_loss on and off), 1 and 3 channels.
    Patch 0 of image 0 is nearly constant (variance ~1e-8, so the 1e-6 inside the sqrt matters) and patch 1
    constant; p = 2 with one channel has 4 values per patch, so biased vs unbiased variance differ by 4/3."""
    rng = np.random.default_rng(chans + 2 * norm_pix)
    p = 2
    images = rng.normal(size=(2, chans, 4, 6))
    images[0, :, :2, :2] = 0.3 + 1e-4 * rng.normal(size=(chans, 2, 2))
    images[0, :, :2, 2:4] = -0.7
    patches = (4 // p) * (6 // p)
    pred = rng.normal(size=(2, patches, p * p * chans))
    mask = (rng.random((2, patches)) < 0.5).astype(np.float64)
    mask[0, :2] = 1.0
    mask[1, 0] = 0.0
    expected = mae_forward_loss(images, pred, mask, p, norm_pix)
    target = patchify(torch.tensor(images, dtype=torch.float32), p)
    got = masked_patch_loss(torch.tensor(pred, dtype=torch.float32), target, torch.tensor(mask, dtype=torch.float32),
                            norm_pix)
    assert got.item() == pytest.approx(expected, rel=1e-5)
