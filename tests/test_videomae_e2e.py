"""VideoMAE V2 end to end on 2 CPU processes: the tiny video recipe under ZeRO-2 and the tiny CT recipe under
ZeRO-3 (every parameter partitioned), killed after a checkpoint and resumed; both lower the loss and export a
3D bundle that rebuilds with the training encoder's features."""
import glob
import json
import os

import pytest

from tests.conftest import REPO, kill_after_checkpoint, metric_history, run_pretrain

pytestmark = pytest.mark.slow


def recipe(name):
    return os.path.join(REPO, "pretrain", "configs", f"{name}.yaml")


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("modality", ["video", "ct"])
def test_tiny_recipes_lower_the_loss_resume_after_a_kill_and_export(modality, video_shards, ct_shards, tmp_path):
    shards = video_shards if modality == "video" else ct_shards
    stage = ["distributed.zero_stage=2"] if modality == "video" else [
        "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0"]
    args = ["train", "--nproc", "2", "--config", recipe(f"videomae_v2_tiny_{modality}_cpu"), f"data.shards={shards}",
            f"output_dir={tmp_path}", "name=run", "train.steps=12", "checkpoint.every=6", "data.batch_size=2",
            "train.image_every=4", "tracking.system_metrics=false", *stage]
    run = os.path.join(str(tmp_path), "run")
    kill_after_checkpoint(args, os.path.join(run, "checkpoints"), 6, 12)
    run_pretrain(args)  # checkpoint.resume=auto: continues from step 6
    losses = metric_history(run)
    assert [step for step, _ in losses][-1] == 12 and {s for s, _ in losses} >= set(range(1, 13))
    assert mean([v for _, v in losses[-4:]]) < mean([v for _, v in losses[:4]])
    decoded = metric_history(run, "decoded_tokens")[-1][1]
    visible = metric_history(run, "visible_tokens")[-1][1]
    assert metric_history(run, "decoder_input_tokens")[-1][1] == decoded + visible
    strips = glob.glob(os.path.join(run, "mlartifacts", "**", "reconstruction_step_*.png"), recursive=True)
    assert any("reconstruction_step_000012" in path for path in strips)  # input | visible | targets | output
    result = run_pretrain(["export", run, "--verify"])
    assert "pretrain.models.vit.VisionTransformer" in result.stdout
    bundle = os.path.join(run, "exports", "step_000012")
    config = json.load(open(os.path.join(bundle, "config.json")))
    assert config["model_args"]["frames"] == (8 if modality == "video" else 16)
    assert json.load(open(os.path.join(bundle, "preprocessing.json")))["modality"] == modality
