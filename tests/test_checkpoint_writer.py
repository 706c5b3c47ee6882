"""Checkpoint files written in place or from a host copy in the background: the copy is the state at the step,
the ranks' reports come before the marker, a failure to write is raised at the next wait, ``auto`` switches on
the measured share."""
import json
import os
import threading
import time

import pytest
import torch

from pretrain import checkpoint, checkpoint_writer, integrity
from pretrain.checkpoint_writer import CheckpointWriteError, CheckpointWriter, HostCopier


def test_host_copy_is_the_state_when_copied_and_reuses_its_buffers():
    weight = torch.arange(6.0).reshape(2, 3)
    view = weight[:, 1]  # a view into a larger storage: copied on its own
    state = {"module": {"w": weight, "tied": weight, "v": view}, "groups": [{"lr": 1.0, "params": [0, 1]}], "step": 3}
    copier = HostCopier()
    copied = copier.copy("model.pt", state)
    weight.add_(100)
    state["groups"][0]["lr"] = 0.5
    state["groups"][0]["params"].append(2)
    assert torch.equal(copied["module"]["w"], torch.arange(6.0).reshape(2, 3))
    assert copied["module"]["tied"] is copied["module"]["w"]  # one copy of a tensor saved twice, as torch.save
    assert copied["module"]["v"].untyped_storage().nbytes() == 2 * 4
    assert copied["groups"] == [{"lr": 1.0, "params": [0, 1]}] and copied["step"] == 3
    again = copier.copy("model.pt", state)
    assert again["module"]["w"].data_ptr() == copied["module"]["w"].data_ptr()  # the buffer is reused
    assert torch.equal(again["module"]["w"], weight)
    assert copier.nbytes == (6 + 2) * 4


def test_background_writes_the_state_of_the_step_then_reports_then_commits(tmp_path):
    folder = str(tmp_path / "step_000004")
    os.makedirs(folder)
    writer = CheckpointWriter("background", rank=0)
    writer.begin(folder, 4)
    tensor = torch.ones(1000)
    writer.put(os.path.join(folder, "a.pt"), {"t": tensor})
    tensor.zero_()  # the next step changes the weights in place while the thread writes
    seen = []
    writer.finish(lambda: seen.append(sorted(os.listdir(folder))))
    writer.wait()
    assert torch.equal(torch.load(os.path.join(folder, "a.pt"))["t"], torch.ones(1000))
    assert seen == [["COMPLETE.rank0", "a.pt"]]  # every file and the report before the commit
    with open(os.path.join(folder, "COMPLETE.rank0")) as handle:
        assert json.load(handle) == {"files": {"a.pt": integrity.digest(os.path.join(folder, "a.pt"))}, "error": None}
    assert writer.written and writer.written[0][0] == 4


def test_a_failed_background_write_is_reported_and_raised_at_the_next_wait(tmp_path):
    folder = str(tmp_path / "step_000002")
    os.makedirs(folder)
    writer = CheckpointWriter("background", rank=1)
    writer.begin(folder, 2)
    writer.put(os.path.join(folder, "missing", "b.pt"), {"t": torch.zeros(2)})  # no such folder: the write fails
    writer.finish()
    with pytest.raises(CheckpointWriteError, match="step_000002"):
        writer.wait()
    integrity.write_report(folder, 0, {})
    with pytest.raises(RuntimeError, match="rank 1"):  # rank 0's commit stops waiting for this rank
        integrity.await_reports(folder, 2, timeout_s=5)
    writer.wait()  # raised once


def test_the_marker_waits_for_every_rank_and_lists_their_files(tmp_path):
    ckpt_dir = str(tmp_path)
    folder = os.path.join(ckpt_dir, "step_000006")
    os.makedirs(folder)
    for name in ("r0.pt", "r1.pt", "config.yaml"):
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(name.encode() * 100)
    integrity.write_report(folder, 0, {"r0.pt": integrity.digest(os.path.join(folder, "r0.pt"))})
    commit = threading.Thread(target=checkpoint._commit, args=(ckpt_dir, folder, 6, 2, 3, 30.0))
    commit.start()
    time.sleep(0.3)
    assert commit.is_alive() and not checkpoint.is_complete(folder)  # rank 1 is still writing
    integrity.write_report(folder, 1, {"r1.pt": integrity.digest(os.path.join(folder, "r1.pt"))})
    commit.join(10)
    assert checkpoint.is_complete(folder)
    assert sorted(os.listdir(folder)) == ["COMPLETE", "config.yaml", "r0.pt", "r1.pt"]
    files = integrity.read_marker(folder)["files"]
    assert sorted(files) == ["config.yaml", "r0.pt", "r1.pt"]  # the file no rank reported is digested by rank 0
    assert integrity.damage(folder, checksums=True) is None
    assert open(os.path.join(ckpt_dir, "latest")).read() == "step_000006"


def test_ranks_that_do_not_report_time_out(tmp_path):
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\]"):
        integrity.write_report(str(tmp_path), 0, {})
        integrity.await_reports(str(tmp_path), 2, timeout_s=0.2)


def test_auto_writes_in_the_background_once_saving_holds_the_run_over_five_percent(monkeypatch):
    writer = CheckpointWriter("auto", rank=0, gpu=True)  # a GPU step leaves the host's cores to the writer
    writer.digests = {"a.pt": {"size": 1 << 20, "crc32": 0}}
    writer.adapt(held_s=0.04, interval_s=1.0, agree=float)
    assert not writer.background
    writer.adapt(held_s=0.06, interval_s=1.0, agree=float)
    assert writer.background
    inline = CheckpointWriter("inline", rank=0, gpu=True)
    inline.adapt(held_s=0.9, interval_s=1.0, agree=float)
    assert not inline.background
    others = iter([0.2, 0.0, 0.0])  # another rank's share, then its "no room" and "no core" flags
    agreed = CheckpointWriter("auto", rank=1, gpu=True)  # under the threshold here, over it on another rank
    agreed.digests = writer.digests
    agreed.adapt(held_s=0.01, interval_s=1.0, agree=lambda value: max(value, next(others)))
    assert agreed.background


def test_auto_stays_inline_without_room_for_the_copy_or_a_free_core(monkeypatch):
    digests = {"a.pt": {"size": 1 << 20, "crc32": 0}}
    monkeypatch.setattr(checkpoint_writer, "HOST_ROOM", 0.0)  # no room for a host copy
    crowded = CheckpointWriter("auto", rank=0, gpu=True)
    crowded.digests = digests
    crowded.adapt(held_s=0.9, interval_s=1.0, agree=float)
    assert not crowded.background and crowded.mode == "inline"
    monkeypatch.setattr(checkpoint_writer, "HOST_ROOM", 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # a CPU step on every core
        assert not checkpoint_writer.spare_core()
        busy = CheckpointWriter("auto", rank=0)
        busy.digests = digests
        busy.adapt(held_s=0.9, interval_s=1.0, agree=float)
        assert not busy.background and busy.mode == "inline"
        if len(os.sched_getaffinity(0)) > 1:
            torch.set_num_threads(1)
            monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
            assert checkpoint_writer.spare_core()
    finally:
        torch.set_num_threads(threads)
