"""Token masking shared by the masked-modelling objectives."""
from __future__ import annotations

import math

import torch


def noise_from_seeds(seeds: torch.Tensor, length: int) -> torch.Tensor:
    """Per-sample uniform noise drawn from each sample's own seed.

    A sample's mask then depends only on the sample (and its pass), not on which
    process or batch position it lands in, so runs on 1 or N processes mask alike.

    Args:
        seeds: [B] int64 per-sample seeds (stamped by the data pipeline).
        length: tokens per sample.

    Returns:
        [B, length] float32 in [0, 1).
    """
    gen = torch.Generator()
    rows = []
    for seed in seeds.tolist():
        gen.manual_seed(int(seed))
        rows.append(torch.rand(length, generator=gen))
    return torch.stack(rows)


def random_masking(noise: torch.Tensor, keep: int) -> tuple:
    """Per-sample random masking by argsort of noise (MAE).

    Args:
        noise: [B, L] noise; the ``keep`` lowest-noise tokens stay visible.
        keep: visible tokens per sample.

    Returns:
        ids_keep [B, keep] (visible token indices), ids_restore [B, L] (undoes the shuffle),
        mask [B, L] (1 = masked, 0 = visible, in original token order).
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens: [B, L, D], ids: [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def block_mask(grid_h: int, grid_w: int, masked: int, gen: torch.Generator, min_block: int = 4,
               aspect: tuple = (0.3, 1 / 0.3), tries: int = 10) -> torch.Tensor:
    """Block-wise mask (BEiT / iBOT) with exactly ``masked`` patches set.

    Rectangles of random area (at least ``min_block`` patches, at most what is still missing)
    and log-uniform aspect ratio are placed at random positions while they add patches without
    overshooting; whatever rectangles cannot fill is topped up with random single patches.

    Returns:
        [grid_h * grid_w] bool, row-major.
    """
    masked = min(masked, grid_h * grid_w)
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    count = 0
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    while count < masked:
        placed = False
        for _ in range(tries):
            missing = masked - count
            u = torch.rand(4, generator=gen).tolist()
            area = min_block + u[0] * max(0, missing - min_block)
            ratio = math.exp(log_low + u[1] * (log_high - log_low))
            height = int(round(math.sqrt(area * ratio)))
            width = int(round(math.sqrt(area / ratio)))
            if not (0 < height <= grid_h and 0 < width <= grid_w):
                continue
            top = int(u[2] * (grid_h - height + 1))
            left = int(u[3] * (grid_w - width + 1))
            window = mask[top:top + height, left:left + width]
            new = int((~window).sum())
            if 0 < new <= missing:
                window.fill_(True)
                count += new
                placed = True
                break
        if not placed:
            break
    flat = mask.flatten()
    if count < masked:
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=gen)[: masked - count]]] = True
    return flat


def ibot_masks(seeds: torch.Tensor, crops: int, grid: tuple, ratio_range: tuple, probability: float) -> torch.Tensor:
    """iBOT masks of the global crops, drawn from each sample's seed.

    Each crop is masked with ``probability``; a masked crop gets a block-wise mask of
    ``round(r * patches)`` patches with r uniform in ``ratio_range``.

    Args:
        seeds: [B] per-sample seeds.
        crops: global crops per sample.
        grid: (rows, cols) patch grid of a global crop.

    Returns:
        [crops * B, rows * cols] bool, crop-major (all samples' crop 0, then crop 1, ...).
    """
    patches = grid[0] * grid[1]
    masks = torch.zeros(crops, len(seeds), patches, dtype=torch.bool)
    gen = torch.Generator()
    for index, seed in enumerate(seeds.tolist()):
        for crop in range(crops):
            gen.manual_seed((int(seed) + 7919 * (crop + 1)) % 2**63)
            draw = torch.rand(2, generator=gen).tolist()
            if draw[0] < probability:
                ratio = ratio_range[0] + draw[1] * (ratio_range[1] - ratio_range[0])
                masks[crop, index] = block_mask(grid[0], grid[1], int(round(ratio * patches)), gen)
    return masks.flatten(0, 1)
