"""Shard lists, fsspec opening, per-reader splitting and the resumable stream cursor.

Shards are addressed by URL (local path, file://, http(s)://, s3://, gs://) and opened
through fsspec, so one code path serves every store.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Dict, List

import braceexpand
import fsspec

from data_pipeline.errors import BadInputError


def _is_shard(url: str) -> bool:
    return url.endswith((".tar", ".tar.gz", ".tgz"))


def resolve_shards(spec: str) -> List[str]:
    """Expand a shard spec into URLs.

    ``spec`` is a comma-separated list whose items are shard URLs with optional brace
    ranges (``data/xray-{000000..000009}.tar``) or folders/URLs holding a
    ``manifest.json`` written by ``pretrain shards``.

    Raises:
        BadInputError: an empty spec, or a folder without a readable manifest.
    """
    urls: List[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if _is_shard(item) or "{" in item:
            urls.extend(braceexpand.braceexpand(item))
            continue
        manifest_url = posixpath.join(item.rstrip("/"), "manifest.json")
        try:
            with fsspec.open(manifest_url, "rt") as handle:
                manifest = json.load(handle)
        except FileNotFoundError:
            raise BadInputError(item, "is not a shard and holds no manifest.json") from None
        except (OSError, ValueError) as exc:
            raise BadInputError(manifest_url, f"cannot read manifest: {exc}") from None
        urls.extend(posixpath.join(item.rstrip("/"), entry["name"]) for entry in manifest.get("shards", []))
    if not urls:
        raise BadInputError(spec or "data.shards", "no shards given")
    return urls


def check_shards_exist(urls: List[str]) -> None:
    """Fail at start-up, naming the first shard URL that does not exist."""
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise BadInputError(url, "shard not found")


def open_shard(url: str):
    """A readable binary stream for a shard URL (HTTP is streamed, not range-read)."""
    options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, "rb", **options).open()


@dataclass
class Cursor:
    """Where one reader stands: pass index, samples taken in this pass, samples skipped so far."""

    pass_index: int = 0
    position: int = 0
    skipped: int = 0
    shard_errors: int = 0


@dataclass
class StreamState:
    """Position of one process's data stream, saved with every checkpoint.

    A process reads with ``num_workers`` readers (at least 1); the DataLoader takes
    their batches round-robin, so ``batches`` tells which reader comes next and each
    reader's :class:`Cursor` tells where it resumes.
    """

    world_size: int = 1
    num_workers: int = 1
    batches: int = 0
    cursors: Dict[int, Cursor] = field(default_factory=dict)

    def advance(self, reader: int, cursor: dict) -> None:
        """Record that a batch from ``reader`` ending at ``cursor`` was consumed."""
        self.cursors[reader] = Cursor(**cursor)
        self.batches += 1

    @property
    def skipped(self) -> int:
        """Undecodable samples skipped so far, over all readers."""
        return sum(c.skipped for c in self.cursors.values())

    @property
    def shard_errors(self) -> int:
        """Unreadable or truncated shards met so far, over all readers."""
        return sum(c.shard_errors for c in self.cursors.values())

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batches": self.batches,
                "cursors": {str(k): vars(v) for k, v in self.cursors.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "StreamState":
        """Inverse of :meth:`to_dict`."""
        cursors = {int(k): Cursor(**v) for k, v in data.get("cursors", {}).items()}
        return cls(data["world_size"], data["num_workers"], data["batches"], cursors)

    def check_compatible(self, world_size: int, num_workers: int) -> None:
        """A saved stream resumes exactly only with the same process and worker counts."""
        if (self.world_size, self.num_workers) != (world_size, max(1, num_workers)):
            raise ValueError(
                f"the data stream was saved with {self.world_size} process(es) x {self.num_workers} reader(s); "
                f"resume with the same process count and data.num_workers (now {world_size} x {max(1, num_workers)})"
            )
