"""Token masking shared by the masked-modelling objectives."""
from __future__ import annotations

import math

import torch

from data_pipeline.stream import stable_seed


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
    ``int(r * patches)`` patches (truncated, as DINOv2's collate does) with r uniform in ``ratio_range``.
    Each crop's generator is seeded by a hash of (sample seed, crop), so no two crops of any samples share
    a stream.

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
            gen.manual_seed(stable_seed(int(seed), "ibot", crop))  # distinct for every (sample, crop)
            draw = torch.rand(2, generator=gen).tolist()
            if draw[0] < probability:
                ratio = ratio_range[0] + draw[1] * (ratio_range[1] - ratio_range[0])
                masks[crop, index] = block_mask(grid[0], grid[1], max(1, int(ratio * patches)), gen)
    return masks.flatten(0, 1)


def masked_count(tokens: int, ratio: float) -> int:
    """Tokens hidden at ``ratio``: ``int(ratio * tokens)``, truncated as VideoMAE's generators do (at least 1,
    at most ``tokens - 1``, so the encoder and the decoder always have something)."""
    return min(tokens - 1, max(1, int(ratio * tokens)))


def tube_mask(seeds: torch.Tensor, grid: tuple, ratio: float) -> torch.Tensor:
    """Tube masking (VideoMAE's TubeMaskingGenerator): the same random spatial mask in every time step.

    Args:
        seeds: [B] per-sample seeds.
        grid: token grid (t, h, w).
        ratio: fraction of spatial positions masked (``masked_count`` of them, the same for every sample).

    Returns:
        [B, t*h*w] bool, True = masked (hidden from the encoder), time-major token order.
    """
    t, h, w = grid
    masked = masked_count(h * w, ratio)
    order = torch.argsort(noise_from_seeds(seeds, h * w), dim=1)
    spatial = torch.zeros(len(seeds), h * w, dtype=torch.bool)
    spatial.scatter_(1, order[:, :masked], True)
    return spatial[:, None, :].expand(-1, t, -1).reshape(len(seeds), t * h * w)


def random_mask(seeds: torch.Tensor, tokens: int, ratio: float) -> torch.Tensor:
    """Random token masking (VideoMAE's RandomMaskingGenerator), ``masked_count`` tokens per sample:
    [B, tokens] bool, True = masked."""
    masked = masked_count(tokens, ratio)
    order = torch.argsort(noise_from_seeds(seeds, tokens), dim=1)
    mask = torch.zeros(len(seeds), tokens, dtype=torch.bool)
    return mask.scatter_(1, order[:, :masked], True)


def cell_drops(ratio: float) -> int:
    """Positions of each 2 x 2 cell the running-cell pattern drops: ``int(4 * ratio)``, truncated as
    VideoMAE V2's RunningCellMaskingGenerator does."""
    return int(4 * ratio)


def running_cell(grid: tuple, ratio: float, offset: int) -> torch.Tensor:
    """The running-cell pattern (VideoMAE V2's decoder masking): [t*h*w] bool, True = kept for the decoder.

    The plane is tiled by 2 x 2 cells. In time step ``k`` the cell position ``i`` (row-major in
    the cell) is dropped when ``(i + k + offset) mod 4`` is below :func:`cell_drops`: every cell
    drops the same share in every step, and the dropped positions move by one each step, so
    over 4 steps every position is dropped equally often. The 4 offsets give the 4 patterns of
    the reference generator (its pointer ``p`` is our ``offset - 1``).
    """
    t, h, w = grid
    dropped_per_cell = cell_drops(ratio)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cell_index = (rows % 2) * 2 + (cols % 2)
    steps = torch.arange(t)[:, None, None]
    return (((cell_index[None] + steps + offset) % 4) >= dropped_per_cell).reshape(-1)


def check_decoder_grid(grid: tuple, ratio: float) -> None:
    """Running-cell decoder masking tiles the plane by whole 2 x 2 cells (so every sample decodes the same
    number of tokens): refuse odd planes and ratios that drop no position or all of them."""
    if ratio == 0:
        return
    if not 0 < cell_drops(ratio) < 4:
        raise ValueError(f"objective.videomae.decoder_mask_ratio={ratio} drops int(4 * ratio) = {cell_drops(ratio)} "
                         "of each 2 x 2 cell; it must drop 1 to 3 (ratio 0.25 to 0.99), or be 0 (no decoder masking)")
    if grid[1] % 2 or grid[2] % 2:
        raise ValueError(f"running-cell decoder masking needs an even token plane, the model's grid is {tuple(grid)} "
                         "(t, h, w): choose model.img_size / patch_size even, or objective.videomae.decoder_mask_ratio=0")


def decoder_positions(mask: torch.Tensor, seeds: torch.Tensor, grid: tuple, ratio: float) -> tuple:
    """Where the decoder gets mask tokens, and which of them are scored (VideoMAE V2's dual masking).

    With ``ratio`` > 0 the decoder gets a mask token at every position the sample's running-cell
    pattern keeps (offset drawn from its seed), visible positions included, and the loss scores
    only those the encoder did not see; with ``ratio`` 0 (plain VideoMAE) it gets one at every
    hidden position and scores all of them.

    Returns:
        decoded [B, tokens] bool (the same count per sample), scored [B, tokens] bool (decoded and hidden).
    """
    if ratio == 0:
        return mask, mask
    offsets = (noise_from_seeds(seeds * 7919 + 2, 1)[:, 0] * 4).long()
    decoded = torch.stack([running_cell(grid, ratio, int(o)) for o in offsets])
    return decoded, decoded & mask


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
    """VideoMAE V2's masks: 'encoder_mask' [B, tokens] bool (tube or random masking), the positions of the
    visible tokens 'visible_ids' [B, V] and of the decoder's mask tokens 'decoded_ids' [B, M] (static counts,
    so the step gathers by index), and 'scored' [B, M] bool: which decoded positions the loss scores
    (:func:`decoder_positions`)."""
    tokens = grid[0] * grid[1] * grid[2]
    mask = tube_mask(seeds, grid, ratio) if masking == "tube" else random_mask(seeds, tokens, ratio)
    decoded, scored = decoder_positions(mask, seeds, grid, decoder_ratio)
    decoded_ids = positions_of(decoded)
    return {"encoder_mask": mask, "visible_ids": positions_of(~mask), "decoded_ids": decoded_ids,
            "scored": torch.gather(scored, 1, decoded_ids)}
