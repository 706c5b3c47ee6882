"""Reused shared batch buffers (data_pipeline/batch_memory.py): same batches, and never one a consumer still holds."""
import itertools
import time

import torch

from data_pipeline.pipelines import build_loader
from pretrain.config import DataConfig
from pretrain.objectives import DataSpec

SPEC = DataSpec(kind="single", img_size=32, in_chans=1)


def loader(shards, reuse=True):
    cfg = DataConfig(shards=shards, batch_size=4, num_workers=2, shuffle_buffer=8, reuse_batch_memory=reuse)
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
