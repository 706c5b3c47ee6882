"""Reused shared batch buffers (data_pipeline/batch_memory.py): same batches, and never one a consumer still holds."""
import itertools
import time

import pytest
import torch
from webdataset.tariterators import group_by_keys

from data_pipeline.batch_memory import BatchBuffers
from data_pipeline.modalities import build_preparer
from data_pipeline.pipelines import build_loader
from data_pipeline.shards import resolve_shards, tar_members
from data_pipeline.stream import batches
from pretrain.config import DataConfig, load_config
from pretrain.objectives import DataSpec

SPEC = DataSpec(kind="single", img_size=32, in_chans=1)


def loader(shards, reuse=True):
    cfg = DataConfig(shards=shards, batch_size=4, num_workers=2, shuffle_buffer=8, reuse_batch_memory=reuse)
    cfg.resolve_sources({})  # the one source of the short form, as load_config makes it
    return build_loader(cfg, SPEC, seed=3, rank=0, world_size=1)[0]


def test_reused_buffers_carry_exactly_the_batches_of_fresh_memory(xray_shards):
    reusing, fresh = loader(xray_shards), loader(xray_shards, reuse=False)
    got = [(b["key"], b["image"].clone(), b["seed"]) for b in itertools.islice(reusing, 30)]  # let go at once
    want = [(b["key"], b["image"].clone(), b["seed"]) for b in itertools.islice(fresh, 30)]
    assert reusing.reused >= 26 and reusing.fresh + reusing.reused == 30  # at most the first round is not reused
    assert fresh.reused == 0 and fresh.buffers is None
    for (keys, image, seed), (want_keys, want_image, want_seed) in zip(got, want):
        assert keys == want_keys and torch.equal(image, want_image) and torch.equal(seed, want_seed)
    assert got[0][2].dtype == torch.int64


def test_a_batch_or_a_view_the_consumer_holds_is_never_overwritten(xray_shards):
    stream = loader(xray_shards)
    kept = []  # (what the consumer keeps, a copy taken when it arrived)
    for index, batch in enumerate(itertools.islice(stream, 40)):
        if index % 3 == 0:
            kept.append((batch["image"], batch["image"].clone()))  # the whole batch
        elif index % 3 == 1 and index < 20:
            view = batch["image"][1:3, :, 4:]  # only a view of it
            kept.append((view, view.clone()))
        del batch
    assert all(torch.equal(held, copy) for held, copy in kept)
    assert stream.reused > 8  # slots the consumer let go of were used again...
    assert stream.fresh > 0  # ...and when it held them all, batches came in fresh memory
    time.sleep(1)  # the workers finish the batches they were asked for in advance
    stream.release()
    busy = stream.buffers.board.count_nonzero().item()
    kept.clear()
    stream.release()
    assert stream.buffers.board.count_nonzero().item() < busy  # letting go hands slots back


VIEW_CASES = {  # fixture, modality, the objective's DataSpec, data overrides
    "single": ("xray_shards", "xray", DataSpec(kind="single", img_size=32, in_chans=1), []),
    "multicrop": ("tile_shards", "pathology",
                  DataSpec(kind="multicrop", img_size=32, in_chans=3, local_crops=3, local_size=16), []),
    "volume": ("ct_shards", "ct", DataSpec(kind="volume", img_size=16, in_chans=1, depth=8), []),
    "clip": ("video_shards", "video", DataSpec(kind="clip", img_size=16, in_chans=3, frames=4),
             ["data.video.stride=2"]),
}


@pytest.mark.parametrize("kind", list(VIEW_CASES))
def test_the_batching_stage_copies_every_view_kind_into_reused_rows_exactly(kind, request):
    """Preparers return tensors of their own (they know nothing of batches); the stream's batching stage
    copies each into its row of a slot's buffers, values unchanged, and the batch from the slot holds them.
    (Replaces the test of views written in place into rows, an interface issue 18 removed.)"""
    fixture, modality, spec, extra = VIEW_CASES[kind]
    shards = request.getfixturevalue(fixture)
    cfg = load_config(None, [f"data.shards={shards}", f"data.modality={modality}", f"model.in_chans={spec.in_chans}",
                             f"data.transforms.mean={[0.5] * spec.in_chans}",
                             f"data.transforms.std={[0.25] * spec.in_chans}", *extra])
    prepare = build_preparer(cfg.data.sources[0], spec)
    raws = list(itertools.islice(group_by_keys(tar_members(resolve_shards(shards).urls[0])), 2))
    own = [prepare(raw, 11 + k) for k, raw in enumerate(raws)]
    buffers = BatchBuffers(workers=1, sources=1)
    take = lambda: buffers.take(0, 0, 2)  # noqa: E731
    rows, slot = next(batches(2, report=None, take=take)(iter(dict(p, url="u", index=0) for p in own)))
    made = slot.finish()
    views = [name for name, value in own[0].items() if torch.is_tensor(value)]
    for name in views:
        for row in range(2):
            assert torch.equal(made[name][row], own[row][name])
        assert made[name].is_contiguous() and made[name].is_shared()
    assert all(not any(torch.is_tensor(v) for v in r.values()) for r in rows)  # the tensors went into the rows


def test_multicrop_batches_with_and_without_local_crops_come_through_reused_buffers(tile_shards):
    for local_crops in (2, 0):
        spec = DataSpec(kind="multicrop", img_size=32, in_chans=3, local_crops=local_crops, local_size=16)
        cfg = load_config(None, [f"data.shards={tile_shards}", "data.modality=pathology", "data.batch_size=4",
                                 "data.num_workers=1", "data.split_by=sample", "model.in_chans=3",
                                 "data.transforms.mean=[0.5,0.5,0.5]", "data.transforms.std=[0.25,0.25,0.25]"])
        stream = build_loader(cfg.data, spec, seed=0, rank=0, world_size=1)[0]
        batches = [{name: b[name].clone() for name in ("global_crops", "local_crops")}
                   for b in itertools.islice(stream, 8)]
        assert stream.reused == 8
        assert batches[-1]["global_crops"].shape == (4, 2, 3, 32, 32)
        assert batches[-1]["local_crops"].shape == (4, local_crops, 3, 16, 16)
        assert not torch.equal(batches[0]["global_crops"], batches[1]["global_crops"])


def test_buffers_are_page_locked_once_per_slot_generation_not_per_batch(xray_shards, monkeypatch):
    """With a GPU the training process registers each slot's buffers with CUDA when it first maps them (here
    the CUDA calls are recorded instead: the machine has no GPU)."""
    from data_pipeline import batch_memory

    pinned, unpinned = [], []
    monkeypatch.setattr(batch_memory, "pin", lambda buffers: pinned.append(sorted(buffers)) or True)
    monkeypatch.setattr(batch_memory, "unpin", lambda buffers: unpinned.append(sorted(buffers)))
    stream = loader(xray_shards)
    stream.pin = True
    for batch in itertools.islice(stream, 30):
        del batch
    assert stream.reused >= 26
    assert 1 <= len(pinned) <= 2 * batch_memory.SLOTS and all(names == ["image"] for names in pinned)
    assert len(unpinned) == len(pinned)  # each mapping replaces none (an empty one) or an older generation
