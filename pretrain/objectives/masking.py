"""Token masking shared by the masked-modelling objectives."""
from __future__ import annotations

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
