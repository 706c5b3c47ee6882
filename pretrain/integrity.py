"""Checkpoint integrity: every file of a checkpoint listed with its size and CRC-32 in the completion marker.

A shared file system can hand back a checkpoint that was complete when written and is damaged when
read: a file cut short by a full quota, a byte flipped on a failing disk. The ``COMPLETE`` marker,
written last, is JSON::

    {"step": 50, "files": {"mp_rank_00_model_states.pt": {"size": 1234, "crc32": 305419896}, ...}}

:func:`damage` says what is wrong with a checkpoint folder (a file missing, of another size, or with
another checksum), or nothing. Sizes are always checked (a ``stat`` per file); checksums, which read
every byte, when asked (``checkpoint.verify=checksum``, ``pretrain export --checksums``). The ranks
compute the checksums of the files they just wrote in parallel, each a share of the list
(:func:`digests`). A marker of an older checkpoint holds only the step: such a checkpoint is taken as
it is.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from typing import Dict, List, Optional

MARKER = "COMPLETE"
CHUNK = 8 << 20
"""Bytes read at a time while checksumming."""
CHECKS = ("size", "checksum")
REPORT = MARKER + ".rank{}"
"""A rank's report of the files it wrote of a checkpoint (JSON ``{"files": {path: digest}, "error"}``):
rank 0 writes the marker once every rank's report is there, then deletes them."""


def crc32(path: str) -> int:
    """CRC-32 of a file's bytes."""
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            value = zlib.crc32(block, value)
    return value


def listing(folder: str) -> List[str]:
    """Every file under ``folder`` but the marker and the ranks' reports, relative to it, sorted."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MARKER and not rel.startswith(REPORT.format("")) and not rel.endswith(".tmp"):
                found.append(rel)
    return sorted(found)


def digest(path: str) -> dict:
    """``{"size", "crc32"}`` of a file."""
    return {"size": os.path.getsize(path), "crc32": crc32(path)}


def digests(folder: str, rank: int = 0, world: int = 1) -> Dict[str, dict]:
    """Size and CRC-32 of every ``world``-th file of the listing from ``rank`` (one rank's share)."""
    return {rel: digest(os.path.join(folder, rel)) for rel in listing(folder)[rank::world]}


def _write_json(path: str, value) -> None:
    """``value`` as JSON at ``path``, through a temporary file and a rename: never seen half written."""
    with open(path + ".tmp", "w") as handle:
        json.dump(value, handle)
    os.replace(path + ".tmp", path)


def write_report(folder: str, rank: int, files: Dict[str, dict], error: Optional[str] = None) -> None:
    """Rank ``rank`` has written ``files`` (their digests) of checkpoint ``folder``, or failed with ``error``."""
    _write_json(os.path.join(folder, REPORT.format(rank)), {"files": files, "error": error})


def await_reports(folder: str, world: int, timeout_s: float) -> Dict[str, dict]:
    """The files every one of ``world`` ranks reported for checkpoint ``folder``, once all have (polling;
    each report is read once, when it appears).

    Raises:
        RuntimeError: a rank reported a failure (as soon as its report appears).
        TimeoutError: not every rank reported within ``timeout_s``.
    """
    waiting = {rank: os.path.join(folder, REPORT.format(rank)) for rank in range(world)}
    deadline, pause, files = time.monotonic() + timeout_s, 0.005, {}
    while waiting:
        for rank, path in list(waiting.items()):
            if os.path.isfile(path):
                with open(path) as handle:
                    report = json.load(handle)
                if report.get("error"):
                    raise RuntimeError(f"{folder}: {report['error']}")
                files.update(report["files"])
                del waiting[rank]
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: rank(s) {sorted(waiting)} did not finish writing within {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.5)
    return files


def remove_reports(folder: str, world: int) -> None:
    """Delete the ranks' reports (after the marker holds what they said)."""
    for rank in range(world):
        try:
            os.remove(os.path.join(folder, REPORT.format(rank)))
        except FileNotFoundError:
            pass


def write_marker(folder: str, step: int, files: Dict[str, dict]) -> None:
    """Write the completion marker (through a temporary file, so a marker is never half written)."""
    _write_json(os.path.join(folder, MARKER), {"step": step, "files": files})


def read_marker(folder: str) -> dict:
    """``{"step", "files"}`` of a checkpoint's marker; ``files`` is None for an older marker (the step only).

    Raises:
        ValueError: the marker is neither (it is damaged itself).
    """
    with open(os.path.join(folder, MARKER)) as handle:
        text = handle.read().strip()
    if text.isdigit():
        return {"step": int(text), "files": None}
    try:
        marker = json.loads(text)
        return {"step": int(marker["step"]), "files": dict(marker["files"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{os.path.join(folder, MARKER)}: not a completion marker ({exc})") from None


def damage(folder: str, checksums: bool = False) -> Optional[str]:
    """What is wrong with checkpoint ``folder`` against its marker (None: nothing): the first file that
    is missing, of another size or (with ``checksums``) with another CRC-32, or an unreadable marker."""
    try:
        files = read_marker(folder)["files"]
    except (OSError, ValueError) as exc:
        return str(exc)
    for rel, expected in sorted((files or {}).items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{path} has {size} bytes, {expected['size']} were written"
        if checksums and crc32(path) != expected["crc32"]:
            return f"{path} does not match the checksum written with it"
    return None
