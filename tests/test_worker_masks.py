"""Masks drawn in the DataLoader workers (DataSpec.masks) equal the masks the objectives drew in the training
step from the same seeds, row for row."""
import os

import pytest
import torch

from data_pipeline.pipelines import build_loader
from pretrain.config import load_config
from pretrain.objectives import build_objective
from tests.conftest import REPO

RECIPES = {"mae": ("mae_tiny_cpu", ["mae_noise"]), "dinov2": ("dinov2_tiny_cpu", ["ibot_masks"]),
           "videomae_v2": ("videomae_v2_tiny_ct_cpu", ["decoded_ids", "encoder_mask", "scored",
                                                       "visible_ids"])}


@pytest.mark.parametrize("objective_name", sorted(RECIPES))
def test_worker_masks_equal_the_batch_draw_on_the_seeds(objective_name, xray_shards, ct_shards):
    recipe, fields = RECIPES[objective_name]
    shards = ct_shards if objective_name == "videomae_v2" else xray_shards
    cfg = load_config(os.path.join(REPO, "pretrain", "configs", f"{recipe}.yaml"),
                      [f"data.shards={shards}", "data.num_workers=1", "data.batch_size=4"])
    objective = build_objective(cfg)
    spec = objective.data_spec()
    assert spec.masks.names() == fields
    loader, _, _ = build_loader(cfg.data, spec, seed=0, rank=0, world_size=1)
    batches = iter(loader)
    for _ in range(2):
        batch = next(batches)
        expected = spec.masks.batch(torch.as_tensor(batch["seed"]))
        for name in fields:
            assert torch.equal(batch[name], expected[name]), name
