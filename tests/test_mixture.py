"""Mixing sources by weight: the schedule, one modality per batch, and exact resume with 2 ranks x 2 workers."""
from __future__ import annotations

import itertools

import pytest
import torch

from data_pipeline.mixture import WeightedSchedule
from data_pipeline.pipelines import build_loader
from data_pipeline.stream_state import StreamState
from pretrain.config import ConfigError, load_config
from pretrain.objectives import DataSpec

SPEC = DataSpec(kind="single", img_size=32, in_chans=1)


def mixture_cfg(xray_shards, tile_shards, workers=0, xray_weight=3.0, tile_weight=1.0, split_by="shard"):
    return load_config(None, [
        "data.batch_size=2", f"data.num_workers={workers}", "data.shuffle_buffer=4", f"data.split_by={split_by}",
        f"data.sources=[{{name: chest, shards: '{xray_shards}', modality: xray, weight: {xray_weight}}},"
        f" {{name: slides, shards: '{tile_shards}', modality: pathology, weight: {tile_weight},"
        "   transforms: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]", "model.stems={pathology: 3}",
    ])


def take(cfg, count, rank=0, world=1, state=None):
    loader, stream, _ = build_loader(cfg.data, SPEC, seed=5, rank=rank, world_size=world, state=state,
                                     stems=cfg.model.stems)
    batches = []
    for batch in itertools.islice(loader, count):
        stream.state.advance(batch["__reader__"], batch["__cursor__"])
        batches.append(batch)
    return batches, StreamState.from_dict(stream.state.to_dict())


def test_schedule_keeps_every_prefix_within_one_batch_of_the_weights():
    weights = [0.5, 0.3, 0.2]
    schedule = WeightedSchedule(weights)
    counts = [0, 0, 0]
    for batch in range(1000):
        counts[schedule.source_at(batch)] += 1
        for count, weight in zip(counts, weights):
            assert abs(count - weight * (batch + 1)) <= 1.0
    assert [WeightedSchedule(weights).source_at(b) for b in range(50)] == [schedule.source_at(b) for b in range(50)]
    with pytest.raises(ValueError, match="positive"):
        WeightedSchedule([1.0, 0.0])


def test_batches_hold_one_source_each_in_the_weighted_proportion(xray_shards, tile_shards):
    batches, _ = take(mixture_cfg(xray_shards, tile_shards, workers=2), 16)
    sources = [b["source"] for b in batches]
    assert sources.count("chest") == 12 and sources.count("slides") == 4
    for batch in batches:
        channels = 1 if batch["source"] == "chest" else 3
        assert batch["image"].shape == (2, channels, 32, 32)
        assert all(url.startswith(xray_shards if channels == 1 else tile_shards) for url in batch["url"])
        assert batch["modality"] == ("xray" if channels == 1 else "pathology")


def test_mixture_resumes_exactly_with_two_ranks_and_two_workers(xray_shards, tile_shards):
    cfg = mixture_cfg(xray_shards, tile_shards, workers=2, xray_weight=1.0, split_by="sample")  # 3 tile shards
    for rank in range(2):
        full, _ = take(cfg, 14, rank=rank, world=2)  # past the end of a pass of the tile source (24 / 2 ranks / 2)
        head, state = take(cfg, 5, rank=rank, world=2)
        tail, _ = take(cfg, 9, rank=rank, world=2, state=state)
        assert [b["key"] for b in full] == [b["key"] for b in head + tail]
        assert [b["source"] for b in full] == [b["source"] for b in head + tail]
        for expected, got in zip(full, head + tail):
            assert torch.equal(expected["image"], got["image"])
    per_rank = [take(cfg, 12, rank=rank, world=2)[0] for rank in range(2)]
    assert [b["source"] for b in per_rank[0]] == [b["source"] for b in per_rank[1]]  # same modality per step
    tile_keys = [k for batches in per_rank for b in batches if b["source"] == "slides" for k in b["key"]]
    assert len(tile_keys) == 24 and len(set(tile_keys)) == 24  # one pass: every tile once, none twice


def test_sources_are_checked_when_the_config_loads(xray_shards):
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, [f"data.sources=[{{name: a, shards: '{xray_shards}'}}, {{name: a, shards: x}}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(b\): modality ct needs a stem"):
        load_config(None, [f"data.sources=[{{name: b, shards: '{xray_shards}', modality: ct}}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(b\): transforms.mean/std need 3"):
        load_config(None, [f"data.sources=[{{name: b, shards: '{xray_shards}', modality: ct}}]", "model.stems={ct: 3}"])


@pytest.mark.slow
def test_one_vit_pretrains_on_three_modalities_under_zero3_and_exports_any_stem(xray_shards, tile_shards,
                                                                               tmp_path):
    """The mixture recipe (X-rays, CT slabs, pathology tiles; a stem each) on 2 processes with every
    parameter partitioned, then export with the pathology stem, parity-checked through timm and transformers."""
    import json
    import os

    from omegaconf import OmegaConf

    from data_pipeline.writers import write_ct_shards
    from data_pipeline.synthetic import write_nifti
    from tests.conftest import REPO, TINY, metric_history, run_pretrain

    (tmp_path / "raw_ct").mkdir()
    for index in range(4):
        write_nifti(str(tmp_path / "raw_ct" / f"v{index}.nii.gz"), seed=index)
    write_ct_shards(str(tmp_path / "raw_ct"), str(tmp_path / "ct"), samples_per_shard=2, progress=False)
    recipe = OmegaConf.load(os.path.join(REPO, "pretrain", "configs", "mae_mixture_cpu.yaml"))
    for source, shards in zip(recipe.data.sources, (xray_shards, str(tmp_path / "ct"), tile_shards)):
        source.shards = shards
    OmegaConf.save(recipe, tmp_path / "mixture.yaml")
    run_pretrain(["train", "--nproc", "2", "--config", str(tmp_path / "mixture.yaml"), *TINY,
                  f"output_dir={tmp_path}", "name=mix", "data.num_workers=0", "data.batch_size=2",
                  "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0", "train.steps=6",
                  "checkpoint.every=0"])
    run = str(tmp_path / "mix")
    assert all(v == v for _, v in metric_history(run)) and len(metric_history(run)) == 6
    for name in ("chest_xray", "ct_slabs", "pathology_tiles"):
        assert metric_history(run, f"loss/{name}"), name
    shares = {name: metric_history(run, f"share/{name}")[-1][1] for name in ("chest_xray", "ct_slabs")}
    assert shares == pytest.approx({"chest_xray": 0.5, "ct_slabs": 1 / 3}, abs=0.17)  # 6 batches: within one
    result = run_pretrain(["export", run, "--verify", "--stem", "pathology"])
    assert "parity with the training encoder" in result.stdout  # --verify raises over its tolerance
    bundle = os.path.join(run, "exports", "step_000006")
    assert json.load(open(os.path.join(bundle, "config.json")))["model_args"]["in_chans"] == 3
    assert json.load(open(os.path.join(bundle, "preprocessing.json")))["modality"] == "pathology"
