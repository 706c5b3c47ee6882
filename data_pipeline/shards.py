"""Shard lists, manifests, fsspec opening and tar reading (stream positions: data_pipeline/stream_state.py).

Shards are addressed by URL (local path, file://, http(s)://, s3://, gs://) and opened
through fsspec, so one code path serves every store.
"""
from __future__ import annotations

import json
import mmap
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import braceexpand
import fsspec

from data_pipeline import mapped_tar
from data_pipeline.errors import BadInputError
from data_pipeline.retry import RetryPolicy, retried, transient


READ_BLOCK = 1 << 20
"""Bytes per read from a shard stream (Python's tar default, 10 KiB, costs a call per 10 KiB of a CT volume)."""
MAPPED_MIN = 1 << 16
"""Members of a local tar at least this large are memoryviews into the mapped file (see tar_members)."""
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_MANIFEST_KEYS = ("modality", "format_version", "shards", "total_samples", "skipped", "source")


def load_manifest(path_or_dir: str) -> dict:
    """Read and check a ``manifest.json`` (given itself or the folder or URL holding it; opened with fsspec).

    Returns:
        The manifest dict: ``modality``, ``format_version``, ``shards`` (list of
        ``{"name", "samples"}``), ``total_samples``, ``skipped``, ``source``.

    Raises:
        BadInputError: naming the manifest file, when it is missing, not JSON,
            or its fields are missing or inconsistent.
    """
    path = path_or_dir if path_or_dir.endswith(".json") else path_or_dir.rstrip("/") + "/" + MANIFEST_NAME
    def read():
        with fsspec.open(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)

    try:
        manifest = retried(read, path)
    except FileNotFoundError as exc:
        if transient(exc):
            raise BadInputError(path, f"cannot reach manifest: {exc}") from exc
        raise BadInputError(path, "manifest not found; write shards with data_pipeline.write_shards first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(path, f"cannot read manifest: {exc}") from exc
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: str, manifest) -> None:
    """Raise BadInputError naming ``path`` unless ``manifest`` has the fields write_modality_shards writes."""
    if not isinstance(manifest, dict):
        raise BadInputError(path, "manifest must be a JSON object")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise BadInputError(path, f"manifest is missing {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        version = manifest["format_version"]
        raise BadInputError(path, f"format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards or not all(_is_shard_entry(s) for s in shards):
        raise BadInputError(path, "'shards' must be a non-empty list of {'name': str, 'samples': positive int}")
    if manifest["total_samples"] != sum(s["samples"] for s in shards):
        raise BadInputError(path, f"total_samples {manifest['total_samples']} differs from the sum over shards")
    if not isinstance(manifest["skipped"], list):
        raise BadInputError(path, "'skipped' must be a list")


def _is_shard_entry(entry) -> bool:
    """Whether ``entry`` is ``{"name": str, "samples": positive int}``."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("samples"), int)
        and entry["samples"] > 0
    )


def _is_shard(url: str) -> bool:
    return url.endswith((".tar", ".tar.gz", ".tgz"))


@dataclass
class ShardList:
    """Resolved shard URLs, with what their manifests say (where the spec named manifests)."""

    urls: List[str]
    manifest_samples: int = 0
    """Samples listed by the manifests read."""
    skipped_files: int = 0
    """Source files the shard writer skipped (unreadable, corrupt), per the manifests read."""
    conversions: List[dict] = field(default_factory=list)
    """The ``conversion`` entries of the manifests read (kind and options, e.g. ``encoding``, ``max_side``)."""


def resolve_shards(spec: str) -> ShardList:
    """Expand a shard spec into URLs.

    ``spec`` is a comma-separated list whose items are shard URLs with optional brace
    ranges (``data/xray-{000000..000009}.tar``) or folders/URLs holding a
    ``manifest.json`` written by ``pretrain shards``.

    Raises:
        BadInputError: an empty spec, or a folder without a valid manifest.
    """
    found = ShardList(urls=[])
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if _is_shard(item) or "{" in item:
            found.urls.extend(braceexpand.braceexpand(item))
            continue
        manifest = load_manifest(item)
        found.urls.extend(posixpath.join(item.rstrip("/"), entry["name"]) for entry in manifest["shards"])
        found.manifest_samples += manifest["total_samples"]
        found.skipped_files += len(manifest["skipped"])
        if "conversion" in manifest:
            found.conversions.append(manifest["conversion"])
    if not found.urls:
        raise BadInputError(spec or "data.shards", "no shards given")
    return found


def check_shards_exist(urls: List[str], retry: Optional[RetryPolicy] = None) -> None:
    """Fail at start-up, naming the first shard URL that does not exist or cannot be reached (a transient
    error of a remote store is retried first, :func:`~data_pipeline.retry.retried`)."""
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        try:
            retried(lambda: fs.info(path), url, retry)
        except Exception as exc:
            if isinstance(exc, FileNotFoundError) and not transient(exc):
                raise BadInputError(url, "shard not found") from None
            raise BadInputError(url, f"cannot reach shard: {exc}") from exc


def open_shard(url: str):
    """A readable binary stream for a shard URL (HTTP is streamed, not range-read)."""
    options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, "rb", **options).open()


class _TailTracker:
    """Wraps a binary stream, remembering how many bytes passed and the last 1024 of them."""

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        self.tail = (self.tail + data[-1024:])[-1024:]
        return data


def _streamed_members(archive: tarfile.TarFile, url: str) -> Iterator[dict]:
    """Regular members of a tar read as a stream, as dicts (``"__"`` names, WebDataset metadata, left out)."""
    while (member := archive.next()) is not None:
        if member.isreg() and not member.name.startswith("__"):
            yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": url}
        archive.members = []  # a one-pass reader needs no index of past members


def _mapped_members(mapped: mmap.mmap, url: str) -> Iterator[dict]:
    """Regular members of a tar mapped in memory (see data_pipeline/mapped_tar.py); a member of at least
    ``MAPPED_MIN`` bytes is a read-only ``memoryview`` into the mapping: nothing is read until a decoder
    touches it, so samples a reader passes over (another reader's, a resumed pass) cost only their tar
    headers, and a ``.npy`` crop reads only the pages it needs."""
    view = memoryview(mapped)
    for name, start, size in mapped_tar.walk(mapped, url):
        if not name.startswith("__"):
            data = view[start:start + size] if size >= MAPPED_MIN else mapped[start:start + size]
            yield {"fname": name, "data": data, "__url__": url}


def tar_members(url: str) -> Iterator[dict]:
    """The files of a tar shard as {'fname', 'data', '__url__'} dicts, in archive order.

    A local ``.tar`` is mapped in memory and its headers walked directly (large members are
    views into the mapping, small ones bytes; see :func:`_mapped_members`); other shards (remote,
    or compressed) are read with ``tarfile`` as a stream (``r|*``: no seeking, so HTTP and S3
    stream too) in blocks of ``READ_BLOCK`` bytes. Both readers end quietly when an archive is
    cut between members, so an uncompressed shard is also checked for its end-of-archive marker
    (two zero blocks).

    Raises:
        BadInputError: the shard is truncated, has a corrupt header or is not a tar archive.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if url.endswith(".tar") and "file" in fs.protocol:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            if size == 0:
                raise BadInputError(url, "empty shard (0 bytes)")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            yield from _mapped_members(mapped, url)
            tail = mapped[max(0, size - 1024):]
        if size % 512 or tail != bytes(1024):
            raise BadInputError(url, f"truncated shard: {size} bytes and no end-of-archive marker")
        return
    with open_shard(url) as raw:
        stream = _TailTracker(raw)
        yield from _streamed_members(tarfile.open(fileobj=stream, mode="r|*", bufsize=READ_BLOCK), url)
        while stream.read(1 << 16):
            pass
        if url.endswith(".tar") and (stream.total % 512 or stream.tail != bytes(1024)):
            raise BadInputError(url, f"truncated shard: {stream.total} bytes and no end-of-archive marker")
