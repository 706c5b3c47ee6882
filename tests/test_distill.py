"""Distillation (objective ``distill``): the losses against equations written here from the G2SD paper and
for feature matching, the teacher frozen outside the optimizer, and 2-process runs of the tiny recipes from a
tiny MAE teacher trained here: loss falls (g2sd under ZeRO-3, feature under ZeRO-2), a killed run resumes
bit-exactly, a changed teacher is refused on resume, the students export with timm / transformers parity."""
import math
import os
import shutil

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.objectives import build_objective
from pretrain.objectives.distill_losses import feature_losses, g2sd_losses
from pretrain.objectives.masking import gather_tokens, mae_noise, random_masking
from tests.conftest import (REPO, TINY, assert_same_weights, checkpoint_weights, metric_history, resume_after_kill,
                            run_pretrain, train_teacher)

pytestmark = pytest.mark.slow

G2SD = os.path.join(REPO, "pretrain", "configs", "distill_g2sd_tiny_cpu.yaml")
FEATURE = os.path.join(REPO, "pretrain", "configs", "distill_feature_tiny_cpu.yaml")
STEPS = 8
STUDENT = ["model.img_size=32", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "optim.warmup_steps=2",
           "optim.lr=2e-3", "data.shuffle_buffer=16", "data.split_by=sample", "data.num_workers=0",
           "objective.distill.decoder_dim=16", "objective.distill.decoder_heads=2"]


def layer_norm0(x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def smooth_l1(x, y, beta):
    d = (x - y).abs()
    return torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean()


def test_g2sd_losses_are_smooth_l1_against_plain_normed_teacher_features():
    gen = torch.Generator().manual_seed(0)
    s_dec, t_dec = torch.randn(2, 5, 6, generator=gen) * 3, torch.randn(2, 5, 6, generator=gen) * 4 + 1
    s_enc, t_enc = torch.randn(2, 3, 8, generator=gen) * 3, torch.randn(2, 3, 8, generator=gen) * 2
    for beta in (2.0, 0.5):
        got = g2sd_losses(s_dec, t_dec, s_enc, t_enc, beta)
        assert got["decoder_loss"].item() == pytest.approx(smooth_l1(s_dec, layer_norm0(t_dec), beta).item(), rel=1e-5)
        assert got["visible_loss"].item() == pytest.approx(smooth_l1(s_enc, layer_norm0(t_enc), beta).item(), rel=1e-5)


def test_feature_losses_are_cosine_distance_or_mse_of_plain_normed_tokens():
    gen = torch.Generator().manual_seed(1)
    s_cls, t_cls = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    s_p, t_p = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    cosine = feature_losses(s_cls, t_cls, s_p, t_p, "cosine")
    manual = 1 - (s_p * t_p).sum(-1) / (s_p.norm(dim=-1) * t_p.norm(dim=-1))
    assert cosine["patch_loss"].item() == pytest.approx(manual.mean().item(), rel=1e-5)
    assert feature_losses(s_cls, s_cls * 3, s_p, s_p, "cosine")["cls_loss"].item() == pytest.approx(0, abs=1e-6)
    mse = feature_losses(s_cls, t_cls, s_p, t_p, "mse")
    assert mse["cls_loss"].item() == pytest.approx(((layer_norm0(s_cls) - layer_norm0(t_cls)) ** 2).mean().item(),
                                                   rel=1e-5)


@pytest.fixture(scope="module")
def teacher(xray_shards, tmp_path_factory):
    """A tiny MAE (48 wide, 2 decoder blocks) trained 6 steps on 1 process: checkpoints at steps 3 and 6."""
    decoder = "objective.mae.decoder_depth=2"
    return train_teacher(tmp_path_factory, "teacher", xray_shards, "model.embed_dim=48", decoder, "train.steps=6",
                         "checkpoint.every=3", "checkpoint.keep_last=2")


def distill_args(recipe, out, name, shards, teacher, *extra, nproc=2):
    return ["train", "--nproc", str(nproc), "--config", recipe, *STUDENT, f"output_dir={out}", f"name={name}",
            f"data.shards={shards}", f"objective.distill.teacher={teacher}", f"train.steps={STEPS}",
            "checkpoint.every=4", *extra]


@pytest.fixture(scope="module")
def runs(teacher, xray_shards, tmp_path_factory):
    """g2sd on 2 processes under ZeRO-3 and feature (cosine, a 32 -> 48 projector) under ZeRO-2."""
    out = str(tmp_path_factory.mktemp("distill"))
    run_pretrain(distill_args(G2SD, out, "g2sd", xray_shards, teacher, "distributed.zero_stage=3",
                              "objective.distill.teacher_decoder_blocks=1"))
    run_pretrain(distill_args(FEATURE, out, "feature", xray_shards, teacher, "distributed.zero_stage=2"))
    return {"g2sd": os.path.join(out, "g2sd"), "feature": os.path.join(out, "feature"), "out": out}


def objective_for(recipe, teacher, shards, *extra):
    return build_objective(load_config(recipe, [*STUDENT, f"objective.distill.teacher={teacher}",
                                                f"data.shards={shards}", *extra]))


def test_teacher_is_frozen_outside_the_optimizer_and_its_targets_follow_the_students_mask(teacher, xray_shards):
    objective = objective_for(G2SD, teacher, xray_shards, "objective.distill.teacher_decoder_blocks=1")
    student_params = {id(p) for p in objective.trainable().parameters()}
    assert all(not p.requires_grad and id(p) not in student_params for p in objective.teacher.parameters())
    images = torch.randn(2, 1, 32, 32)
    seeds = torch.tensor([3, 4])
    batch = {"image": images, "seed": seeds, "mae_noise": mae_noise(seeds, 16)["mae_noise"]}
    out = objective(objective.trainable(), batch, 0)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and set(out.metrics) >= {"decoder_loss", "visible_loss"}
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert all(p.grad is not None for p in objective.trainable().parameters())
    mae = objective.teacher  # the teacher's visible tokens, before its final norm, are those its own MAE encodes
    ids_keep, _, _ = random_masking(batch["mae_noise"], 4)
    trunk = mae.encoder.trunk_tokens(gather_tokens(mae.encoder.embed_patches(images), ids_keep))
    latent, _, _ = mae.visible_tokens(images, batch["mae_noise"])
    assert torch.allclose(mae.encoder.norm(trunk), latent, atol=1e-6)


def test_bad_teachers_are_refused_with_the_key(teacher, xray_shards, tmp_path):
    with pytest.raises(ConfigError, match="objective.distill.teacher is required"):
        load_config(G2SD, [*STUDENT, "objective.distill.teacher=''"]).objective.distill.validate(None)
    with pytest.raises(ConfigError, match="patch size, grid and channels"):
        objective_for(G2SD, teacher, xray_shards, "model.img_size=48")
    with pytest.raises(ConfigError, match="teacher's decoder has 2 blocks"):
        objective_for(G2SD, teacher, xray_shards, "objective.distill.teacher_decoder_blocks=3")
    with pytest.raises(Exception, match="no such file or folder"):
        objective_for(FEATURE, str(tmp_path / "nothing"), xray_shards)


@pytest.mark.parametrize("loss", ["g2sd", "feature"])
def test_loss_falls(runs, loss):
    losses = [value for _, value in metric_history(runs[loss])]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_killed_g2sd_run_resumes_exactly_and_refuses_a_changed_teacher(runs, teacher, xray_shards, tmp_path):
    args = distill_args(G2SD, str(tmp_path), "killed", xray_shards, teacher, "distributed.zero_stage=3",
                        "objective.distill.teacher_decoder_blocks=1")
    resume_after_kill(args, os.path.join(str(tmp_path), "killed"), runs["g2sd"], 4, STEPS)
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(str(tmp_path), "killed"), copy)
    other = os.path.join(teacher, "checkpoints", "step_000003")
    refused = run_pretrain(distill_args(G2SD, str(tmp_path), "copy", xray_shards, other,
                                        "distributed.zero_stage=3", "objective.distill.teacher_decoder_blocks=1",
                                        "train.steps=10"),
                           check=False)
    assert refused.returncode != 0 and "not those this run was trained with" in refused.stderr


def test_killed_feature_run_resumes_exactly(runs, teacher, xray_shards, tmp_path):
    """The feature loss (a learned projector beside the student) under ZeRO-2: killed after step 4, bit-exact."""
    args = distill_args(FEATURE, str(tmp_path), "killed", xray_shards, teacher, "distributed.zero_stage=2")
    resume_after_kill(args, os.path.join(str(tmp_path), "killed"), runs["feature"], 4, STEPS)


@pytest.mark.parametrize("loss", ["g2sd", "feature"])
def test_students_export_with_timm_and_transformers_parity(runs, loss, tmp_path):
    result = run_pretrain(["export", runs[loss], str(tmp_path / "bundle"), "--verify"])
    assert "parity with the training encoder" in result.stdout
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert names["pos_embed"].shape[-1] == 32 and not any(
        n.startswith(("decoder", "encoder_proj", "proj.", "mae.", "mask_token")) for n in names)


def test_plan_counts_the_teacher_and_its_passes(teacher, xray_shards):
    result = run_pretrain(["plan", "--config", G2SD, "--cluster", os.path.join(REPO, "clusters", "local.yaml"),
                           *STUDENT, f"objective.distill.teacher={teacher}", f"data.shards={xray_shards}",
                           "objective.distill.teacher_decoder_blocks=1"])
    assert "teacher encoder (visible patches)" in result.stdout and "(no grad)" in result.stdout
    assert "frozen (teacher)" in result.stdout


def test_full_size_ct_recipe_runs_tiny_from_a_ct_teacher(ct_shards, tmp_path):
    """distill_g2sd_vitb_to_vits_ct at tiny size, from mae_vitb_ct (its teacher recipe) trained here at tiny size."""
    common = [*TINY, f"output_dir={tmp_path}", f"data.shards={ct_shards}", "data.split_by=sample",
              "data.num_workers=0", "data.batch_size=4", "distributed.precision=fp32", "train.log_every=1"]
    run_pretrain(["train", "--config", os.path.join(REPO, "pretrain", "configs", "mae_vitb_ct.yaml"), *common,
                  "name=ct_teacher", "train.steps=3"])
    run_pretrain(["train", "--config", os.path.join(REPO, "pretrain", "configs", "distill_g2sd_vitb_to_vits_ct.yaml"),
                  *common, "name=ct_student", "train.steps=2", f"objective.distill.teacher={tmp_path}/ct_teacher",
                  "objective.distill.decoder_dim=16", "objective.distill.decoder_depth=1",
                  "objective.distill.decoder_heads=2", "objective.distill.teacher_decoder_blocks=1"])
    assert len(metric_history(str(tmp_path / "ct_student"))) == 2


def test_auto_placement_partitions_only_a_teacher_too_large_to_replicate():
    from pretrain.teachers import partitioned

    teacher = torch.nn.Linear(1000, 1000)  # 1M parameters: 4 MB in fp32
    assert partitioned(teacher, "auto", 80e6) == [] and partitioned(teacher, "auto", 30e6) == [teacher]
    assert partitioned(teacher, "auto", 0) == []  # no GPU: nothing to save
    assert partitioned(teacher, "partitioned", 0) == [teacher] and partitioned(teacher, "replicated", 1e3) == []


def test_a_partitioned_teacher_trains_the_student_its_replicated_copy_trains(runs, teacher, xray_shards):
    """ZeRO-3 over 2 ranks (no optimizer) for the teacher beside the ZeRO-2 student: the same losses and weights."""
    result = run_pretrain(distill_args(FEATURE, runs["out"], "feature_partitioned", xray_shards, teacher,
                                       "distributed.zero_stage=2", "objective.distill.teacher_placement=partitioned"))
    assert "partitioned over 2 rank(s) (ZeRO-3)" in result.stdout + result.stderr
    run = os.path.join(runs["out"], "feature_partitioned")
    assert metric_history(run) == metric_history(runs["feature"])
    final = os.path.join("checkpoints", f"step_{STEPS:06d}")
    assert_same_weights(checkpoint_weights(os.path.join(runs["feature"], final)),
                        checkpoint_weights(os.path.join(run, final)))
