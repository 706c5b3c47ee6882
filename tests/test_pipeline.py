"""The streaming loader: shapes, splitting, exact resume, and bad input that is skipped and counted."""
import itertools
import os

import pytest
import torch

from data_pipeline.errors import BadInputError
from data_pipeline.pipelines import build_loader
from data_pipeline.shards import resolve_shards
from data_pipeline.stream_state import StreamState, rebalance
from pretrain.config import DataConfig
from pretrain.objectives import DataSpec
from tests.conftest import make_bad_shards

SPEC = DataSpec(kind="single", img_size=32, in_chans=1)


def data_cfg(shards, **kw):
    cfg = DataConfig(shards=shards, batch_size=4, num_workers=0, shuffle_buffer=8)
    for key, value in kw.items():
        setattr(cfg, key, value)
    cfg.resolve_sources({})  # the one source of the short form, as load_config makes it
    return cfg


def take(cfg, count, rank=0, world=1, state=None):
    loader, stream, _ = build_loader(cfg, SPEC, seed=3, rank=rank, world_size=world, state=state)
    batches = []
    for batch in itertools.islice(loader, count):
        stream.state.advance(batch["__reader__"], batch["__cursor__"])
        batches.append(batch)
    return batches, stream.state


def test_batches_have_the_declared_shape(xray_shards):
    (batch,), _ = take(data_cfg(xray_shards), 1)
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["seed"].dtype == torch.int64 and len(set(batch["key"])) == 4


def test_manifest_and_brace_specs_resolve_alike(xray_shards):
    from_manifest = resolve_shards(xray_shards)
    from_braces = resolve_shards(os.path.join(xray_shards, "xray-{000000..000005}.tar"))
    assert from_manifest.urls == from_braces.urls and len(from_manifest.urls) == 6
    assert (from_manifest.manifest_samples, from_braces.manifest_samples) == (48, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(xray_shards, workers):
    cfg = data_cfg(xray_shards, num_workers=workers)
    full, _ = take(cfg, 17)  # more than one pass (48 samples / 4)
    head, state = take(cfg, 5)
    restored = StreamState.from_dict(state.to_dict())
    tail, _ = take(cfg, 12, state=restored)
    for expected, got in zip(full, head + tail):
        assert expected["key"] == got["key"]
        assert torch.equal(expected["image"], got["image"])


def test_shard_split_covers_each_sample_once_per_pass(xray_shards):
    cfg = data_cfg(xray_shards, shuffle_buffer=0)
    keys = []
    for rank in range(2):
        batches, _ = take(cfg, 6, rank=rank, world=2)  # 24 samples = one pass of 3 shards
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == 48 and len(set(keys)) == 48


def test_sample_split_gives_the_same_global_batches_on_any_world_size(xray_shards):
    one, _ = take(data_cfg(xray_shards, split_by="sample", batch_size=8), 8)
    two = [take(data_cfg(xray_shards, split_by="sample"), 8, rank=r, world=2)[0] for r in range(2)]
    for step, batch in enumerate(one):
        assert sorted(batch["key"]) == sorted(two[0][step]["key"] + two[1][step]["key"])


def take_until_backlog_done(cfg, rank, world, state):
    """The batches one new process reads from the units dealt to it (the first batch of its own layout ends
    the list: its stamp has an empty backlog)."""
    loader, _, _ = build_loader(cfg, SPEC, seed=3, rank=rank, world_size=world, state=state)
    batches = []
    for batch in loader:
        if not batch["__cursor__"]["cursor"]["backlog"]:
            return batches
        batches.append(batch)


@pytest.mark.parametrize("split_by", ["shard", "sample"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_process_count_reads_the_rest_of_the_pass_exactly_once(xray_shards, split_by, new_world):
    """2 processes x 2 workers take 16 of the 48 samples of a pass; 1 or 3 processes then read the other 32,
    none of them twice (sizes chosen so that every unit fills whole batches)."""
    cfg = data_cfg(xray_shards, split_by=split_by, num_workers=2, shuffle_buffer=0, batch_size=4)
    consumed, saved = [], []
    for rank in range(2):
        batches, state = take(cfg, 2, rank=rank, world=2)
        consumed += [key for batch in batches for key in batch["key"]]
        saved.append(StreamState.from_dict(state.to_dict()))
    new_cfg = data_cfg(xray_shards, split_by=split_by, num_workers=0, shuffle_buffer=0, batch_size=4)
    for rank in range(new_world):
        state = rebalance(saved, new_world, 0, rank)
        before = state.to_dict()
        consumed += [k for b in take_until_backlog_done(new_cfg, rank, new_world, state) for k in b["key"]]
        assert state.to_dict() == before  # reading ahead never changes the saved position; only advance() does
    assert len(consumed) == 48 and len(set(consumed)) == 48
    state = rebalance(saved, 1, 0, 0)
    assert state.readers[0].cursors["xray"].pass_index == 1  # the new layout starts with the next pass


def test_missing_shard_and_too_few_shards_stop_at_start(xray_shards, tmp_path):
    with pytest.raises(BadInputError, match="xray-000006.tar: shard not found"):
        take(data_cfg(os.path.join(xray_shards, "xray-{000000..000009}.tar")), 1)
    with pytest.raises(BadInputError, match="split_by=sample"):
        take(data_cfg(os.path.join(xray_shards, "xray-000000.tar")), 1, world=2)
    with pytest.raises(BadInputError, match="manifest"):
        take(data_cfg(str(tmp_path)), 1)


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(xray_shards, tmp_path):
    spec = make_bad_shards(xray_shards, str(tmp_path))
    cfg = data_cfg(spec, shuffle_shards=False, shuffle_buffer=0)
    batches, state = take(cfg, 6)  # beyond one pass: 8 + some of 8 + 8 good samples
    assert state.skipped >= 1 and state.shard_errors >= 1
    assert all("broken" not in b["key"] for b in batches)


def test_the_raise_policy_stops_at_the_first_bad_sample_naming_its_file(xray_shards, tmp_path):
    spec = make_bad_shards(xray_shards, str(tmp_path))
    with pytest.raises(BadInputError, match=r"bad-000000.tar:broken: sample: "):
        take(data_cfg(spec, shuffle_shards=False, shuffle_buffer=0, on_error="raise"), 1)
    with pytest.raises(BadInputError, match=r"bad-000001.tar: shard: "):
        take(data_cfg(os.path.join(str(tmp_path), "bad-000001.tar"), shuffle_buffer=0, on_error="raise"), 1)


def test_errors_met_again_while_replaying_are_not_counted_twice(xray_shards, tmp_path):
    spec = make_bad_shards(xray_shards, str(tmp_path))
    cfg = data_cfg(spec, shuffle_shards=False, shuffle_buffer=0)
    full, whole = take(cfg, 6)
    head, state = take(cfg, 4)  # past the corrupt sample and into the intact shard after the truncated one
    assert (state.skipped, state.shard_errors) == (1, 1)
    tail, resumed = take(cfg, 2, state=StreamState.from_dict(state.to_dict()))
    assert [b["key"] for b in full] == [b["key"] for b in head + tail]
    assert (resumed.skipped, resumed.shard_errors) == (whole.skipped, whole.shard_errors)


def test_workers_ignore_the_stop_signal_a_preempting_scheduler_sends_them(xray_shards):
    """SLURM preempting without a user signal sends SIGTERM to every process of the task: with
    train.stop_signal=TERM the DataLoader workers ignore it and the stream goes on to the checkpoint."""
    import os
    import signal
    import time

    import psutil

    from data_pipeline.pipelines import build_loader
    from pretrain.config import load_config
    from pretrain.objectives import DataSpec

    cfg = load_config(None, [f"data.shards={xray_shards}", "data.num_workers=1", "data.batch_size=4"])
    loader, _, _ = build_loader(cfg.data, DataSpec(kind="single", img_size=32, in_chans=1), 0, 0, 1,
                                stop_signal="TERM")
    before = {process.pid for process in psutil.Process().children()}
    batches = iter(loader)
    next(batches)
    workers = [process for process in psutil.Process().children() if process.pid not in before]  # the loader's only
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(1)
    assert all(worker.is_running() for worker in workers)
    for _ in range(3):
        assert next(batches)["image"].shape[0] == 4


def test_inspection_lists_every_bad_sample_and_shard_through_the_stream_stages(xray_shards, tmp_path):
    from data_pipeline.inspect_shards import inspect_shards

    report = inspect_shards(make_bad_shards(xray_shards, str(tmp_path)))
    bad = {entry["sample"]: entry["reason"] for entry in report["undecodable"]}
    assert any(where.endswith("bad-000000.tar:broken") for where in bad)
    assert [reason for where, reason in bad.items() if where.endswith("bad-000001.tar")][0].startswith(
        "unreadable shard: ")
    assert report["samples"] >= 16 and report["modalities"]["xray"]["count"] == report["samples"]
