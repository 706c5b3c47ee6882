"""The conversion's shard writer (data_pipeline/tar_shards.py) writes the bytes webdataset's ShardWriter writes
with the options conversion used before it, and the conversion workers' imports stay free of torch."""
import subprocess
import sys

import pytest
import webdataset

from data_pipeline.tar_shards import ShardSequence
from tests.conftest import REPO

SAMPLES = [{"__key__": f"dir/sample_{index:03d}", "png": bytes([index]) * (100 + 700 * index),
            "json": b'{"source": "s%d"}' % index, "_skipped": b"meta", "cls": b"%d" % (index % 3)}
           for index in range(7)]


def test_shards_are_the_bytes_webdataset_writes(tmp_path):
    with webdataset.ShardWriter(str(tmp_path / "wds-%04d.tar"), maxcount=3, verbose=0, encoder=False,
                                mtime=0) as writer:
        for sample in SAMPLES:
            writer.write(dict(sample))
    with ShardSequence(str(tmp_path / "ours-%04d.tar"), maxcount=3) as ours:
        for sample in SAMPLES:
            ours.write(sample)
            assert ours.fname.endswith(f"ours-{SAMPLES.index(sample) // 3:04d}.tar")
    for shard in range(3):
        expected = (tmp_path / f"wds-{shard:04d}.tar").read_bytes()
        assert (tmp_path / f"ours-{shard:04d}.tar").read_bytes() == expected
    assert not (tmp_path / "ours-0003.tar").exists()


def test_no_sample_no_file_and_bad_samples_are_refused(tmp_path):
    with ShardSequence(str(tmp_path / "s-%04d.tar"), maxcount=2) as ours:
        pass
    assert list(tmp_path.iterdir()) == []
    with ShardSequence(str(tmp_path / "s-%04d.tar"), maxcount=2) as ours:
        with pytest.raises(ValueError, match="__key__"):
            ours.write({"png": b"x"})
        with pytest.raises(ValueError, match="'png' of sample 'k' is int"):
            ours.write({"__key__": "k", "png": 3})
        with pytest.raises(ValueError, match="'json' of sample 'k' is str"):
            ours.write({"__key__": "k", "json": "{}"})
    with pytest.raises(ValueError, match="at least 1"):
        ShardSequence(str(tmp_path / "s-%04d.tar"), maxcount=0)


def test_conversion_workers_import_no_torch():
    code = ("import sys; import data_pipeline.conversion, data_pipeline.kinds; "
            "print(sorted(m for m in ('torch', 'torchvision', 'webdataset') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout
