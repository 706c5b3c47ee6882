"""Data sources and the weighted schedule that mixes them, one source per batch.

A run reads one or more sources (``data.sources``; loading the config expands the short form of
one source into that list). Each batch comes from one source, so a batch holds
one modality with its own transforms. Which source feeds a reader's ``k``-th batch is a pure
function of ``k`` and the weights (:class:`WeightedSchedule`, a smooth weighted round-robin):
every rank draws the same source for the same micro-batch, each reader's counts stay within
one batch of ``weight x batches`` (a process's within one batch per reader), and a resumed
run continues the schedule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List


@dataclass
class Source:
    """One resolved source: its shard URLs, its modality preparer (raw sample + seed -> views), its share
    of the batches, its modality and the stem it goes through ('' = the main one)."""

    name: str
    urls: List[str]
    prepare: Callable
    weight: float
    modality: str
    stem: str = ""


class WeightedSchedule:
    """Source index of every process batch, by smooth weighted round-robin.

    Every step each source earns its weight; the source with the most credit is drawn and
    pays back the total. Over any prefix of ``n`` batches, source ``s`` is drawn within one
    batch of ``n * w_s / sum(w)``.
    """

    def __init__(self, weights: List[float]):
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"source weights {weights} must be positive")
        self.weights = [float(w) for w in weights]
        self._restart()

    def _restart(self) -> None:
        self._credit = [0.0] * len(self.weights)
        self._batch, self._source = -1, 0

    def source_at(self, batch: int) -> int:
        """The source index of process batch ``batch`` (0-based). Cheap when asked in increasing order
        (as readers do); an earlier batch replays the schedule from the start."""
        if batch < self._batch:
            self._restart()
        total = sum(self.weights)
        while self._batch < batch:
            self._credit = [c + w for c, w in zip(self._credit, self.weights)]
            self._source = max(range(len(self.weights)), key=lambda i: (self._credit[i], -i))
            self._credit[self._source] -= total
            self._batch += 1
        return self._source


def source_spec(spec, source_cfg, stems: dict):
    """The objective's DataSpec (made for the main stem) with the channels of the source's stem."""
    if source_cfg.stem:
        return dataclasses.replace(spec, in_chans=stems[source_cfg.stem])
    return spec
