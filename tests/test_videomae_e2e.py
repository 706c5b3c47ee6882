"""VideoMAE V2 end to end on 2 CPU processes: the tiny video recipe under ZeRO-2 and the tiny CT recipe under
ZeRO-3 (every parameter partitioned), killed after a checkpoint and resumed; both lower the loss and export a
3D bundle that rebuilds with the training encoder's features; probes on labelled digit clips / volumes
are measured across both ranks during the run."""
import glob
import json
import os

import pytest

from tests.conftest import REPO, kill_after_checkpoint, metric_history, run_pretrain, write_digit_clips, write_digit_volumes

pytestmark = pytest.mark.slow


def recipe(name):
    return os.path.join(REPO, "pretrain", "configs", f"{name}.yaml")


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("modality", ["video", "ct"])
def test_tiny_recipes_lower_the_loss_resume_after_a_kill_and_export(modality, video_shards, ct_shards, tmp_path):
    from data_pipeline.writers import write_ct_shards
    from data_pipeline.writers import write_video_shards

    shards = video_shards if modality == "video" else ct_shards
    write_set, write_shards = ((write_digit_clips, write_video_shards) if modality == "video"
                               else (write_digit_volumes, write_ct_shards))
    write_shards(str(tmp_path / "digits"), str(tmp_path / "probe"), 40, progress=False,
                 labels=write_set(str(tmp_path / "digits"), 80))
    stage = ["distributed.zero_stage=2"] if modality == "video" else [
        "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0"]
    args = ["train", "--nproc", "2", "--config", recipe(f"videomae_v2_tiny_{modality}_cpu"), f"data.shards={shards}",
            f"output_dir={tmp_path}", "name=run", "train.steps=12", "checkpoint.every=6", "data.batch_size=2",
            "train.image_every=4", "tracking.system_metrics=false", f"probe.shards={tmp_path / 'probe'}",
            "probe.every=6", *stage]
    run = os.path.join(str(tmp_path), "run")
    kill_after_checkpoint(args, os.path.join(run, "checkpoints"), 6, 12)
    run_pretrain(args)  # checkpoint.resume=auto: continues from step 6
    losses = metric_history(run)
    assert [step for step, _ in losses][-1] == 12 and {s for s, _ in losses} >= set(range(1, 13))
    assert mean([v for _, v in losses[-4:]]) < mean([v for _, v in losses[:4]])
    knn = metric_history(run, "probe_knn_acc")
    assert [step for step, _ in knn] == [0, 6, 12] and all(0.0 <= v <= 1.0 for _, v in knn)
    assert metric_history(run, "probe_linear_acc")[-1][0] == 12
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
