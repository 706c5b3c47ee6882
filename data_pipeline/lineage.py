"""Data lineage: which samples a run has consumed, as shard URL -> ranges of member indices.

A sample is identified by its shard and its index among the shard's samples, so a
fully read shard costs one range however large it is. At export the ranges are turned
into sample keys, and into the identities the consumed samples' metadata names (patient,
study and series as the writers' truncated SHA-256 hashes, slide, source file), by reading
the shards; ``pretrain lineage check`` compares a downstream team's list of keys or
patients (or studies, series, slides, source files) with them.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import tarfile
from typing import Dict, Iterable, List, Optional, Set, Tuple

import fsspec
from webdataset.tariterators import base_plus_ext

from data_pipeline.xray_io import hash_identifier

log = logging.getLogger(__name__)

IDENTITIES = {"patient": "patient_id_hash", "study": "study_id_hash", "series": "series_id_hash",
              "slide": "slide_id", "source": "source"}
"""What ``pretrain lineage check --by`` can compare besides sample keys -> the metadata field holding it."""
HASHED = ("patient", "study", "series")
"""Identities the writers store only as :func:`~data_pipeline.xray_io.hash_identifier` hashes."""
PLURAL = {"key": "keys", "patient": "patients", "study": "studies", "series": "series", "slide": "slides",
          "source": "sources"}


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
            names, _ = read_shard(url)
            out[url] = [names[i] for start, end in spans for i in range(start, min(end, len(names)))]
        return out

    def manifest(self) -> dict:
        """What ``lineage.json`` holds: the count, the ranges, the consumed sample keys, and per
        identity kind (:data:`IDENTITIES`) the sorted distinct values of the consumed samples."""
        keys: Set[str] = set()
        identities: Dict[str, Set[str]] = {kind: set() for kind in IDENTITIES}
        for url, spans in sorted(self.ranges.items()):
            wanted = {i for start, end in spans for i in range(start, end)}
            names, metas = read_shard(url, wanted)
            keys.update(names[i] for i in wanted if i < len(names))
            for meta in metas.values():
                for kind, field in IDENTITIES.items():
                    if meta.get(field) not in (None, ""):
                        identities[kind].add(str(meta[field]))
        return {"samples_consumed": self.count, "shards": self.to_dict(), "keys": sorted(keys),
                "identities": {kind: sorted(values) for kind, values in identities.items()},
                "hashed": "patient, study and series are the first 16 hex digits of the SHA-256 of the DICOM id"}


def read_shard(url: str, wanted: Optional[Set[int]] = None) -> Tuple[List[str], Dict[int, dict]]:
    """Sample keys of a shard in order (consecutive members sharing a key form one sample), and the
    decoded ``.json`` metadata of the samples whose indices are in ``wanted``."""
    keys: List[str] = []
    metas: Dict[int, dict] = {}
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
        for member in archive:
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if not keys or keys[-1] != key:
                keys.append(key)
            if wanted and ext == "json" and len(keys) - 1 in wanted:
                try:
                    meta = json.loads(archive.extractfile(member).read())
                except (ValueError, OSError, AttributeError) as exc:
                    log.warning("lineage: %s:%s: unreadable metadata (%s); its identities are not listed", url, key, exc)
                    continue
                if isinstance(meta, dict):
                    metas[len(keys) - 1] = meta
    return keys, metas


def shard_keys(url: str) -> List[str]:
    """Sample keys of a shard in order."""
    return read_shard(url)[0]


def seen_keys(bundle: str, keys_file: str, by: str = "key") -> tuple:
    """Which entries of ``keys_file`` (one per line; blank lines and # comments skipped) a bundle's
    pretraining consumed: sample keys, or with ``by`` an identity kind of :data:`IDENTITIES`
    (patient, study and series may be given as raw ids or as the writers' hashes).

    Returns:
        (overlapping entries sorted, number of entries checked).

    Raises:
        FileNotFoundError: naming a missing lineage.json or key file.
        ValueError: an unknown ``by``, or a lineage.json without identities (an older export).
    """
    if by != "key" and by not in IDENTITIES:
        raise ValueError(f"--by {by!r} is not one of {['key', *IDENTITIES]}")
    lineage_file = os.path.join(bundle, "lineage.json")
    for path in (lineage_file, keys_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found")
    with open(lineage_file) as handle:
        lineage = json.load(handle)
    if by == "key":
        consumed = set(lineage["keys"])
    elif by in lineage.get("identities", {}):
        consumed = set(lineage["identities"][by])
    else:
        raise ValueError(f"{lineage_file}: has no {by} identities (exported before they were recorded); "
                         "export the checkpoint again")
    with open(keys_file) as handle:
        wanted = {line.strip() for line in handle if line.strip() and not line.startswith("#")}
    hashed = by in HASHED
    overlap = [value for value in wanted if value in consumed or (hashed and hash_identifier(value) in consumed)]
    return sorted(overlap), len(wanted)
