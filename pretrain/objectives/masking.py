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


def tube_mask(seeds: torch.Tensor, grid: tuple, ratio: float) -> torch.Tensor:
    """Tube masking (VideoMAE): the same random spatial mask in every time step.

    Args:
        seeds: [B] per-sample seeds.
        grid: token grid (t, h, w).
        ratio: fraction of spatial positions masked (rounded to a whole count, same for every sample).

    Returns:
        [B, t*h*w] bool, True = masked (hidden from the encoder), time-major token order.
    """
    t, h, w = grid
    masked = min(h * w - 1, max(1, round(ratio * h * w)))
    order = torch.argsort(noise_from_seeds(seeds, h * w), dim=1)
    spatial = torch.zeros(len(seeds), h * w, dtype=torch.bool)
    spatial.scatter_(1, order[:, :masked], True)
    return spatial[:, None, :].expand(-1, t, -1).reshape(len(seeds), t * h * w)


def random_mask(seeds: torch.Tensor, tokens: int, ratio: float) -> torch.Tensor:
    """Random token masking with the same masked count for every sample: [B, tokens] bool, True = masked."""
    masked = min(tokens - 1, max(1, round(ratio * tokens)))
    order = torch.argsort(noise_from_seeds(seeds, tokens), dim=1)
    mask = torch.zeros(len(seeds), tokens, dtype=torch.bool)
    return mask.scatter_(1, order[:, :masked], True)


def running_cell(grid: tuple, ratio: float, offset: int) -> torch.Tensor:
    """The running-cell pattern (VideoMAE V2's decoder masking): [t*h*w] bool, True = kept for the decoder.

    The plane is tiled by 2 x 2 cells. In time step ``k`` the cell position ``i`` (row-major in
    the cell) is dropped when ``(i + k + offset) mod 4`` is below ``round(4 * ratio)``: every cell
    drops the same share in every step, and the dropped positions move by one each step, so
    over 4 steps every position is dropped equally often.
    """
    t, h, w = grid
    dropped_per_cell = round(4 * ratio)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cell_index = (rows % 2) * 2 + (cols % 2)
    steps = torch.arange(t)[:, None, None]
    return (((cell_index[None] + steps + offset) % 4) >= dropped_per_cell).reshape(-1)


def decoder_targets(mask: torch.Tensor, seeds: torch.Tensor, grid: tuple, ratio: float) -> torch.Tensor:
    """The masked tokens the decoder reconstructs (dual masking): [B, tokens] bool.

    Exactly ``round((1 - ratio) * masked)`` of each sample's masked tokens (a count shared by
    the batch, so shapes stay static): first those the running-cell pattern keeps (offset drawn
    from the sample's seed), then, where the pattern keeps too few or too many of them, the rest
    by the sample's noise. ``ratio`` 0: every masked token (plain VideoMAE).
    """
    masked = int(mask[0].sum())
    keep = masked - round(ratio * masked)
    noise = noise_from_seeds(seeds * 7919 + 1, mask.shape[1])
    offsets = (noise_from_seeds(seeds * 7919 + 2, 1)[:, 0] * 4).long()
    cells = torch.stack([running_cell(grid, ratio, int(o)) for o in offsets])
    priority = mask.float() * 4 + cells.float() * 2 + noise  # masked first, then the cell pattern, then noise
    chosen = torch.argsort(priority, dim=1, descending=True)[:, :keep]
    return torch.zeros_like(mask).scatter_(1, chosen, True)


class PerSample:
    """One sample's share of a batch mask function, for the DataLoader workers (``DataSpec.masks``).

    ``batch_fn(seeds [B], **kwargs)`` returns {name: [B, ...]} with every row drawn from its own seed
    alone, so row ``i`` of the batch call equals the one-sample call on seed ``i``: the workers draw
    each sample's masks beside its views, and the objective gets them stacked in the batch instead of
    drawing them in the training step. Module-level functions and plain settings: it pickles.
    """

    def __init__(self, batch_fn, **kwargs):
        self.batch_fn, self.kwargs = batch_fn, kwargs

    def batch(self, seeds: torch.Tensor) -> dict:
        """The whole batch's draw from its [B] seeds (what the workers' rows stack up to)."""
        return self.batch_fn(seeds, **self.kwargs)

    def __call__(self, seed: int) -> dict:
        return {name: rows[0] for name, rows in self.batch(torch.tensor([seed])).items()}

    def names(self) -> list:
        """The batch fields it adds."""
        return sorted(self(0))


def mae_noise(seeds: torch.Tensor, patches: int) -> dict:
    """MAE's masking noise {'mae_noise': [B, patches] float32} (argsort keeps the lowest)."""
    return {"mae_noise": noise_from_seeds(seeds, patches)}


def ibot_batch_masks(seeds: torch.Tensor, crops: int, grid: tuple, ratio_range: tuple, probability: float) -> dict:
    """{'ibot_masks': [B, crops, patches] bool}: :func:`ibot_masks` sample-major."""
    masks = ibot_masks(seeds, crops, grid, ratio_range, probability)
    return {"ibot_masks": masks.view(crops, len(seeds), -1).transpose(0, 1)}


def positions_of(flags: torch.Tensor) -> torch.Tensor:
    """[B, N] bool with the same count per row -> [B, count] indices of the True entries, ascending."""
    count = int(flags[0].sum())
    return torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :count]


def dual_masks(seeds: torch.Tensor, grid: tuple, masking: str, ratio: float, decoder_ratio: float) -> dict:
    """VideoMAE V2's masks: 'encoder_mask' and 'decoder_targets' [B, tokens] bool (tube or random encoder
    masking, then the decoder's running-cell targets among the masked tokens), and their positions
    'visible_ids' [B, V] and 'target_ids' [B, M] (static counts, so the step gathers by index)."""
    tokens = grid[0] * grid[1] * grid[2]
    mask = tube_mask(seeds, grid, ratio) if masking == "tube" else random_mask(seeds, tokens, ratio)
    targets = decoder_targets(mask, seeds, grid, decoder_ratio)
    return {"encoder_mask": mask, "decoder_targets": targets, "visible_ids": positions_of(~mask),
            "target_ids": positions_of(targets)}
