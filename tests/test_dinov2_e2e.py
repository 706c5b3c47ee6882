"""DINOv2 end to end through the real CLI on 2 processes: ZeRO-2 and ZeRO-3 (every parameter partitioned)
runs of the tiny recipe, exact resume after a kill, teacher export with timm/transformers parity, and the
collapse monitors in MLflow."""
import glob
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from pretrain import checkpoint
from tests.conftest import (REPO, assert_same_weights, checkpoint_weights, kill_after_checkpoint, metric_history,
                            run_pretrain)

pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO, "pretrain", "configs", "dinov2_tiny_cpu.yaml")
STEPS = 12


def dino_args(out, name, shards, stage, *extra):
    return ["train", "--nproc", "2", "--config", RECIPE, f"output_dir={out}", f"name={name}",
            f"data.shards={shards}", "data.batch_size=8", "data.num_workers=1", f"distributed.zero_stage={stage}",
            "distributed.zero3_persistence_threshold=0", f"train.steps={STEPS}", "checkpoint.every=4",
            "train.image_every=6", *extra]


@pytest.fixture(scope="module")
def dino_runs(xray_shards, tmp_path_factory):
    """The tiny DINOv2 recipe for 12 steps on 2 processes under ZeRO-2 and under ZeRO-3."""
    out = str(tmp_path_factory.mktemp("dinov2"))
    runs = {}
    for stage in (2, 3):
        run_pretrain(dino_args(out, f"z{stage}", xray_shards, stage))
        runs[stage] = os.path.join(out, f"z{stage}")
    return runs


def final_checkpoint(run: str) -> str:
    return os.path.join(run, "checkpoints", f"step_{STEPS:06d}")


def teacher_state(ckpt: str) -> dict:
    return checkpoint.load_objective_state(ckpt)["teacher"]


@pytest.mark.parametrize("stage", [2, 3])
def test_total_loss_is_finite_and_decreases(dino_runs, stage):
    losses = [value for _, value in metric_history(dino_runs[stage])]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses


def test_zero2_and_zero3_train_the_same_student_and_teacher(dino_runs):
    students = [checkpoint_weights(final_checkpoint(dino_runs[stage])) for stage in (2, 3)]
    assert_same_weights(*students, atol=1e-4)
    teachers = [teacher_state(final_checkpoint(dino_runs[stage])) for stage in (2, 3)]
    assert_same_weights(*teachers, atol=1e-5)
    initial = checkpoint_weights(final_checkpoint(dino_runs[2]))
    assert any(not torch.allclose(teachers[0][name], initial[name]) for name in teachers[0])  # EMA lags


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 resume exactness: test_train_e2e's killed-run test
def test_killed_run_resumes_exactly(dino_runs, xray_shards, stage, tmp_path):
    args = dino_args(str(tmp_path), "killed", xray_shards, stage)
    ckpts = os.path.join(str(tmp_path), "killed", "checkpoints")
    kill_after_checkpoint(args, ckpts, 4, STEPS)
    run_pretrain(args)
    whole, resumed = final_checkpoint(dino_runs[stage]), os.path.join(ckpts, f"step_{STEPS:06d}")
    assert_same_weights(checkpoint_weights(whole), checkpoint_weights(resumed))
    assert_same_weights(teacher_state(whole), teacher_state(resumed))
    for rank in range(2):
        states = [torch.load(os.path.join(path, f"trainer_state_rank{rank}.pt"), weights_only=False)
                  for path in (whole, resumed)]
        assert states[0]["data"] == states[1]["data"]


@pytest.mark.parametrize("stage", [3])  # consolidating partitioned ZeRO-3 shards; ZeRO-2 takes the same path
def test_export_writes_the_teacher_and_matches_timm_and_transformers(dino_runs, stage, tmp_path):
    run = dino_runs[stage]
    result = run_pretrain(["export", run, str(tmp_path / "teacher"), "--verify"])
    assert "parity with the training encoder" in result.stdout
    exported = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    teacher = {k[len("encoder."):]: v for k, v in teacher_state(final_checkpoint(run)).items()
               if k.startswith("encoder.")}
    assert_same_weights({k: v for k, v in exported.items() if k != "pos_embed"}, teacher)
    assert "teacher encoder of the dinov2 objective" in (tmp_path / "teacher" / "MODEL_CARD.md").read_text()
    if stage == 3:  # the student on request, and a clear error for an unknown name
        run_pretrain(["export", run, str(tmp_path / "student"), "--weights", "student"])
        student = {k[len("encoder."):]: v for k, v in checkpoint_weights(final_checkpoint(run)).items()
                   if k.startswith("encoder.")}
        exported = load_file(str(tmp_path / "student" / "model.safetensors"))
        assert_same_weights({k: v for k, v in exported.items() if k != "pos_embed"}, student)
        wrong = run_pretrain(["export", run, str(tmp_path / "x"), "--weights", "ema"], check=False)
        assert wrong.returncode == 2 and "['teacher', 'student']" in wrong.stderr


def test_collapse_monitors_and_attention_maps_reach_mlflow(dino_runs):
    run = dino_runs[2]
    for key in ("dino_loss", "ibot_loss", "koleo_loss", "teacher_temp", "teacher_momentum"):
        assert len(metric_history(run, key)) == STEPS, key
    entropy = metric_history(run, "teacher_entropy")[-1][1]
    used = metric_history(run, "prototypes_used")[-1][1]
    assert 0.5 < entropy < math.log(256) - 0.05  # neither one prototype nor a uniform teacher
    assert used >= 8  # of at most 32 (2 global crops x 16 images per step)
    temps = [v for _, v in metric_history(run, "teacher_temp")]
    assert temps[0] == pytest.approx(0.04) and temps[-1] == pytest.approx(0.07)
    images = glob.glob(os.path.join(run, "mlartifacts", "**", "attention_step_*.png"), recursive=True)
    assert sorted(os.path.basename(p) for p in images) == ["attention_step_000006.png", "attention_step_000012.png"]


def test_bf16_run_probes_the_fp32_teacher_and_exports_it(xray_shards, tmp_path):
    from data_pipeline.writers import write_xray_shards
    from tests.conftest import write_digits

    labels = write_digits(str(tmp_path / "digits_raw"), 120)
    write_xray_shards(str(tmp_path / "digits_raw"), str(tmp_path / "digits"), 64, progress=False, labels=labels)
    run_pretrain(["train", "--config", RECIPE, f"output_dir={tmp_path}", "name=bf16", f"data.shards={xray_shards}",
                  "distributed.precision=bf16", "distributed.zero_stage=1", "train.steps=2",
                  f"probe.shards={tmp_path / 'digits'}"])
    run = str(tmp_path / "bf16")
    assert all(math.isfinite(v) for _, v in metric_history(run))
    assert 0.0 <= metric_history(run, "probe_knn_acc")[-1][1] <= 1.0
    teacher = teacher_state(os.path.join(run, "checkpoints", "step_000002"))
    assert all(t.dtype == torch.float32 for t in teacher.values())
    run_pretrain(["export", run])
    assert os.path.isfile(os.path.join(run, "exports", "step_000002", "model.safetensors"))


def test_mask_token_learns_at_its_reference_rate_under_layer_decay(dino_runs):
    """In the 2-process ZeRO-2 run (layer_decay 0.9, patch_embed_lr_mult 0.2, depth 2), the optimizer's
    own groups, as checkpointed: the student's iBOT mask token at layer 0 like the patch embedding, lr x
    0.9^(depth + 1) of the heads' (dinov2/utils/param_groups.py get_vit_lr_decay_rate: ".mask_token" -> 0)."""
    ckpt = final_checkpoint(dino_runs[2])
    names = checkpoint.trainer_state(ckpt, 0)["optimizer_param_names"]
    (optim_file,) = glob.glob(os.path.join(ckpt, "**", "zero_pp_rank_0_*optim_states.pt"), recursive=True)
    groups = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"][
        "base_optimizer_state"]["param_groups"]
    assert len(groups) == len(names)
    lr = {name: group["lr"] for group, group_names in zip(groups, names) for name in group_names}
    head = lr["dino_head.mlp.0.weight"]
    assert head > 0
    assert lr["mask_token"] == pytest.approx(head * 0.9 ** 3, rel=1e-6)
    assert lr["encoder.cls_token"] == pytest.approx(head * 0.9 ** 3, rel=1e-6)
    assert lr["encoder.patch_embed.proj.weight"] == pytest.approx(head * 0.9 ** 3 * 0.2, rel=1e-6)
    assert lr["encoder.blocks.1.attn.qkv.weight"] == pytest.approx(head * 0.9, rel=1e-6)
