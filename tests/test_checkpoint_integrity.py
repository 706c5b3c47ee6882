"""Damaged checkpoints are detected against their completion marker and passed over for the one before."""
import logging
import os

import pytest

from pretrain import checkpoint, integrity
from tests.conftest import TINY, run_pretrain


def fake_checkpoint(ckpt_dir, step: int, sizes=(3000, 100)) -> str:
    """A checkpoint folder with files of ``sizes`` bytes and a marker listing them."""
    path = os.path.join(ckpt_dir, checkpoint.tag_for(step))
    os.makedirs(os.path.join(path, "sub"))
    for index, size in enumerate(sizes):
        with open(os.path.join(path, "sub" if index else "", f"file{index}.pt"), "wb") as handle:
            handle.write(bytes((index + k) % 251 for k in range(size)))
    integrity.write_marker(path, step, integrity.digests(path))
    return path


def flip_byte(path: str, offset: int = 1000) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def largest_file(path: str) -> str:
    return max((os.path.join(path, rel) for rel in integrity.listing(path)), key=os.path.getsize)


def test_the_marker_lists_every_file_and_its_shares_add_up(tmp_path):
    path = fake_checkpoint(str(tmp_path), 2)
    marker = integrity.read_marker(path)
    assert marker["step"] == 2 and sorted(marker["files"]) == ["file0.pt", "sub/file1.pt"]
    shares = [integrity.digests(path, rank, 2) for rank in range(2)]
    assert {**shares[0], **shares[1]} == marker["files"] and all(len(share) == 1 for share in shares)
    assert integrity.damage(path) is None and integrity.damage(path, checksums=True) is None


def test_truncation_flips_and_missing_files_are_named(tmp_path):
    path = fake_checkpoint(str(tmp_path), 2)
    flip_byte(os.path.join(path, "file0.pt"))
    assert integrity.damage(path) is None  # the size is unchanged: only the checksum sees it
    assert "file0.pt does not match the checksum" in integrity.damage(path, checksums=True)
    truncate(os.path.join(path, "file0.pt"))
    assert "file0.pt has 1500 bytes, 3000 were written" in integrity.damage(path)
    os.remove(os.path.join(path, "sub", "file1.pt"))
    os.remove(os.path.join(path, "file0.pt"))
    assert integrity.damage(path).endswith("file0.pt is missing")
    with open(os.path.join(path, integrity.MARKER), "w") as handle:
        handle.write("{not json")
    assert "not a completion marker" in integrity.damage(path)


def test_an_older_marker_holding_only_the_step_is_taken_as_it_is(tmp_path):
    path = fake_checkpoint(str(tmp_path), 7)
    with open(os.path.join(path, integrity.MARKER), "w") as handle:
        handle.write("7\n")
    truncate(os.path.join(path, "file0.pt"))
    assert integrity.damage(path, checksums=True) is None and checkpoint.completed_step(path) == 7


def test_the_newest_intact_checkpoint_is_found_and_the_damaged_ones_logged(tmp_path, caplog):
    older, newer = fake_checkpoint(str(tmp_path), 2), fake_checkpoint(str(tmp_path), 4)
    flip_byte(largest_file(newer))
    assert checkpoint.find_latest(str(tmp_path)) == newer
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert checkpoint.find_latest(str(tmp_path), checksums=True) == older
    assert f"passing over checkpoint {newer}" in caplog.text and "checksum" in caplog.text
    truncate(largest_file(newer))
    assert checkpoint.find_latest(str(tmp_path)) == older == checkpoint.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="is damaged: .*bytes"):
        checkpoint.resolve(newer)  # a damaged checkpoint named by hand is an error, not a silent substitute
    truncate(largest_file(older))
    assert checkpoint.find_latest(str(tmp_path)) is None


@pytest.mark.slow
def test_resume_and_export_pass_over_a_damaged_newest_checkpoint(xray_shards, tmp_path):
    """A real run with checkpoints at steps 2 and 4: a flipped byte in step 4's largest file is passed over
    by a resume with checksums and by an export with --checksums; a truncated one by both with sizes only."""
    args = ["train", *TINY, f"output_dir={tmp_path}", "name=damaged", f"data.shards={xray_shards}",
            "data.num_workers=0", "checkpoint.every=2", "checkpoint.keep_last=0", "tracking.backend=jsonl"]
    run_pretrain([*args, "train.steps=4"])
    ckpts = str(tmp_path / "damaged" / "checkpoints")
    step2, step4 = checkpoint.complete_checkpoints(ckpts)
    assert sorted(integrity.read_marker(step4)["files"]) == integrity.listing(step4)
    flip_byte(largest_file(step4))
    exported = run_pretrain(["export", str(tmp_path / "damaged"), "--checksums"])
    assert "step_000002" in exported.stdout
    resumed = run_pretrain([*args, "train.steps=5", "checkpoint.verify=checksum"])
    assert "passing over checkpoint" in resumed.stderr and "resumed from" in resumed.stderr
    assert "at step 2" in resumed.stderr
    truncate(largest_file(step4))
    assert "step_000004" not in run_pretrain(["export", str(tmp_path / "damaged")]).stdout
