"""A step's run-wide metrics as one fixed-length vector, summed over ranks in one collective.

Every rank packs the same layout whatever it drew: its mean loss, its counters, then a (loss sum,
micro-batch count) pair for every source of the stream, zeros for the sources it did not draw. A
collective whose length depended on a rank's own data (the sources it saw this step) would pair
different values across ranks or hang; this one cannot. The losses stay device tensors until the
vector is read.

    layout: [loss, *counter_names(sources), loss_sum(source_0), count(source_0), loss_sum(source_1), ...]
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

COUNTERS = ("skipped_samples", "shard_errors", "shard_retries")
"""Per-rank counters summed over ranks; with several sources ``shard_retries/<source>`` follow them."""


def counter_names(names: Sequence[str]) -> List[str]:
    """The counters of a stream of the sources ``names`` (empty: one source), in the vector's order."""
    return list(COUNTERS) + [f"shard_retries/{name}" for name in names]


def pack(losses: Sequence[torch.Tensor], sources: Sequence[str], names: Sequence[str],
         counters: Sequence[float]) -> torch.Tensor:
    """This rank's vector (float64, on the losses' device) for a step of micro-batch ``losses`` drawn from
    ``sources``; ``names`` are every source of the stream in a fixed order (empty: no per-source part)."""
    if len(counters) != len(counter_names(names)):
        raise ValueError(f"{len(counters)} counters for {counter_names(names)}")
    stacked = torch.stack([loss.detach().to(torch.float64) for loss in losses])
    device = stacked.device
    parts = [stacked.mean().reshape(1), torch.tensor([float(c) for c in counters], dtype=torch.float64, device=device)]
    for name in names:
        picked = [loss.detach().to(torch.float64) for loss, source in zip(losses, sources) if source == name]
        total = torch.stack(picked).sum() if picked else torch.zeros((), dtype=torch.float64, device=device)
        parts.append(torch.stack([total, torch.tensor(float(len(picked)), dtype=torch.float64, device=device)]))
    return torch.cat([part.reshape(-1) for part in parts])


def unpack(summed: Sequence[float], names: Sequence[str], world: int) -> Dict[str, float]:
    """The metrics of a vector summed over ``world`` ranks: the mean loss, the counters' sums and
    ``loss/<source>`` (mean over the micro-batches of every rank that drew it) for each source drawn."""
    values: List[float] = list(summed)
    metrics = {"loss": values[0] / world}
    counters = counter_names(names)
    metrics.update(zip(counters, values[1:1 + len(counters)]))
    start = 1 + len(counters)
    for index, name in enumerate(names):
        total, count = values[start + 2 * index], values[start + 2 * index + 1]
        if count:
            metrics[f"loss/{name}"] = total / count
    return metrics
