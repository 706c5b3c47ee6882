"""Data lineage: which samples a run has consumed, as shard URL -> ranges of member indices.

A sample is identified by its shard and its index among the shard's samples, so a
fully read shard costs one range however large it is. At export the ranges are turned
into sample keys by reading the shards' tar headers, and ``pretrain lineage check``
compares a downstream team's key list with them.
"""
from __future__ import annotations

import bisect
import tarfile
from typing import Dict, Iterable, List

import fsspec
from webdataset.tariterators import base_plus_ext


class Lineage:
    """Consumed samples per shard URL as sorted, disjoint, half-open ``[start, end)`` ranges."""

    def __init__(self, ranges: Dict[str, List[List[int]]] = None):
        self.ranges: Dict[str, List[List[int]]] = {url: [list(r) for r in spans]
                                                   for url, spans in (ranges or {}).items()}

    def add_range(self, url: str, start: int, end: int) -> None:
        """Record that samples ``start`` to ``end - 1`` of shard ``url`` were consumed."""
        spans = self.ranges.setdefault(url, [])
        first = bisect.bisect_left([span[1] for span in spans], start)  # first span ending at/after start
        last = first
        while last < len(spans) and spans[last][0] <= end:  # every span touching [start, end)
            start, end = min(start, spans[last][0]), max(end, spans[last][1])
            last += 1
        spans[first:last] = [[start, end]]

    def add(self, url: str, index: int) -> None:
        """Record that sample ``index`` of shard ``url`` was consumed."""
        self.add_range(url, index, index + 1)

    def add_batch(self, urls: Iterable[str], indices: Iterable[int]) -> None:
        """Record a batch's samples."""
        for url, index in zip(urls, indices):
            self.add(url, int(index))

    def update(self, other: "Lineage") -> None:
        """Add everything ``other`` recorded (for merging the ranks of a run)."""
        for url, spans in other.ranges.items():
            for start, end in spans:
                self.add_range(url, start, end)

    @property
    def count(self) -> int:
        """Samples recorded."""
        return sum(end - start for spans in self.ranges.values() for start, end in spans)

    def to_dict(self) -> Dict[str, List[List[int]]]:
        """JSON-serialisable ranges."""
        return {url: [list(r) for r in spans] for url, spans in sorted(self.ranges.items())}

    def keys(self) -> Dict[str, List[str]]:
        """Sample keys of the recorded samples, per shard (reads the shards' tar headers)."""
        out = {}
        for url, spans in sorted(self.ranges.items()):
            names = shard_keys(url)
            out[url] = [names[i] for start, end in spans for i in range(start, min(end, len(names)))]
        return out


def shard_keys(url: str) -> List[str]:
    """Sample keys of a shard in order: consecutive members sharing a key form one sample."""
    keys: List[str] = []
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
        for member in archive:
            key, _ = base_plus_ext(member.name)
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


def seen_keys(bundle: str, keys_file: str) -> tuple:
    """Which keys of ``keys_file`` (one per line; blank lines and # comments skipped) a bundle's
    pretraining consumed.

    Returns:
        (overlapping keys sorted, number of keys checked).

    Raises:
        FileNotFoundError: naming a missing lineage.json or key file.
    """
    import json
    import os

    lineage_file = os.path.join(bundle, "lineage.json")
    for path in (lineage_file, keys_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found")
    with open(lineage_file) as handle:
        consumed = set(json.load(handle)["keys"])
    with open(keys_file) as handle:
        wanted = {line.strip() for line in handle if line.strip() and not line.startswith("#")}
    return sorted(wanted & consumed), len(wanted)
