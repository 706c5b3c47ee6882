"""The members of a local, uncompressed tar shard, read straight from its memory mapping.

Python's ``tarfile`` builds a ``TarInfo`` per member, about 60 us each here: for small
samples (a pathology tile is two members of ~20 KB) that was a twentieth of the decode
time. This walk reads the 512-byte headers with slicing and ``int()`` instead. It knows
what tar writers put in shards:

* ustar headers, with the name prefix of POSIX ustar;
* POSIX pax records (``x``: ``path`` and ``size`` for the next member; ``g`` is skipped);
* GNU long names (``L``) and base-256 sizes.

Unlike ``tarfile``, which ends an archive quietly at a header it cannot read, a header
whose checksum does not match is an error naming its byte offset, so a damaged shard
is counted instead of silently cut short. Remote and compressed shards still go through
``tarfile`` (data_pipeline/shards.py).
"""
from __future__ import annotations

import mmap
from typing import Iterator, Tuple

from data_pipeline.errors import BadInputError

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED = (b"g", b"K")  # pax global headers and GNU long link names: nothing a sample needs
_ZERO_BLOCK = bytes(BLOCK)


def _number(field: bytes, url: str, offset: int) -> int:
    """An octal header field, or GNU base-256 where the first byte has its high bit set."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            raise BadInputError(url, f"negative number in the tar header at byte {offset}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise BadInputError(url, f"tar header at byte {offset}: {field!r} is not an octal number") from None


def _checksum_matches(header: bytes, url: str, offset: int) -> bool:
    """Whether the stored checksum is the sum of the header's bytes (its own field read as
    spaces), as unsigned or, as some old writers computed it, signed bytes."""
    try:
        stored = _number(header[148:156], url, offset)
    except BadInputError:  # not even a number where the checksum goes: not a tar header
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for byte in header[:148] + header[156:] if byte >= 128)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes, url: str, offset: int) -> dict:
    """``{key: value}`` of a pax extended header's ``"<length> <key>=<value>\\n"`` records."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] not in (b"\0", b""):
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise BadInputError(url, f"malformed pax record in the tar header at byte {offset}") from None
        record = data[space + 1:position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise BadInputError(url, f"malformed pax record in the tar header at byte {offset}")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value
        position += length
    return records


def walk(mapped: mmap.mmap, url: str) -> Iterator[Tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular member of the tar mapped in ``mapped``, in
    archive order, up to its first zero block or the end of the mapping.

    Raises:
        BadInputError: naming ``url`` and the byte offset, for a header or member cut off by the end
            of the file, a header whose checksum does not match, or an unreadable number or pax record.
    """
    total = len(mapped)
    offset, long_name, pax = 0, None, {}
    while offset < total:
        header = mapped[offset:offset + BLOCK]
        if len(header) < BLOCK:
            raise BadInputError(url, f"truncated shard: a tar header at byte {offset} of {total}")
        if header == _ZERO_BLOCK:
            return
        if not _checksum_matches(header, url, offset):
            raise BadInputError(url, f"corrupt tar header at byte {offset} (checksum mismatch)")
        kind = header[156:157]
        extension = kind in (b"x", b"L") or kind in _SKIPPED
        size = int(pax["size"]) if "size" in pax and not extension else _number(header[124:136], url, offset)
        start = offset + BLOCK
        end = start + size
        if end > total:
            what = "an extended header" if extension else f"member {_name(header, pax, long_name)}"
            raise BadInputError(url, f"truncated shard: {what} ends at byte {end} of {total}")
        offset = start + -(-size // BLOCK) * BLOCK
        if kind == b"x":
            pax = _pax_records(mapped[start:end], url, start)
        elif kind == b"L":
            long_name = mapped[start:end].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif not extension:
            if kind in _REGULAR:
                yield _name(header, pax, long_name), start, size
            pax, long_name = {}, None


def _name(header: bytes, pax: dict, long_name) -> str:
    """A member's name: its pax ``path``, else its GNU long name, else the header's (ustar prefix first)."""
    if "path" in pax:
        return pax["path"].decode("utf-8", "surrogateescape")
    if long_name is not None:
        return long_name
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")
