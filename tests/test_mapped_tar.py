"""The direct header walk of mapped local tars (data_pipeline/mapped_tar.py) against Python's tarfile."""
import io
import tarfile

import pytest

from data_pipeline.errors import BadInputError
from data_pipeline.shards import MAPPED_MIN, tar_members

LONG_DIR = "patients/" + "p" * 120  # over ustar's 100-character name field
MEMBERS = [
    ("s0.jpg", b"\xff\xd8" + bytes(range(256)) * 7),
    ("s0.json", b'{"slide": "a"}'),
    (f"{LONG_DIR}/s1.jpg", b"x" * (MAPPED_MIN + 5)),  # large: a view of the mapping
    ("s1.json", b""),  # empty member
    ("t\u00e9st/s2.cls", b"3"),  # non-ASCII name
    (("d" * 90 + "/") * 2 + "s3.png", b"png!"),  # fits ustar's prefix + name split
]


def write_tar(path, fmt, members=MEMBERS):
    with tarfile.open(path, "w", format=fmt) as archive:
        folder = tarfile.TarInfo("patients")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        if fmt == tarfile.PAX_FORMAT:
            archive.pax_headers = {"comment": "global header"}
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5e9 + 0.25  # a float mtime: pax writes a record for it
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "s0.jpg"
        archive.addfile(link)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
def test_the_walk_reads_what_tarfile_reads(tmp_path, fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar has no long or non-ASCII names
        members = [(n, d) for n, d in MEMBERS if not n.startswith(LONG_DIR) and n.isascii()]
    else:
        members = MEMBERS
    path = tmp_path / "shard-000000.tar"
    write_tar(path, fmt, members)
    with tarfile.open(path) as archive:
        expected = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers() if m.isreg()]
    got = [(m["fname"], bytes(m["data"])) for m in tar_members(str(path))]
    assert got == expected == members
    kinds = [type(m["data"]) for m in tar_members(str(path))]
    assert kinds == [memoryview if len(data) >= MAPPED_MIN else bytes for _, data in members]


def test_a_corrupt_header_is_an_error_naming_its_offset_where_tarfile_stops_quietly(tmp_path):
    path = tmp_path / "shard-000000.tar"
    write_tar(path, tarfile.GNU_FORMAT)
    raw = bytearray(path.read_bytes())
    second = 512 + 512 * -(-len(MEMBERS[0][1]) // 512) + 512  # folder header, s0.jpg header + data
    raw[second + 130] ^= 0x01  # one bit of s0.json's size field
    path.write_bytes(bytes(raw))
    with tarfile.open(path) as archive:  # what tarfile alone would do: one member, then silence
        assert [m.name for m in archive.getmembers() if m.isreg()] == ["s0.jpg"]
    with pytest.raises(BadInputError, match=f"corrupt tar header at byte {second}"):
        list(tar_members(str(path)))


def test_a_file_that_is_not_a_tar_is_an_error_naming_it(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a tar" * 40)
    with pytest.raises(BadInputError, match="shard-000000.tar.*corrupt tar header at byte 0"):
        list(tar_members(str(path)))
