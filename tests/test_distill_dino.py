"""Distillation with the dino loss (``objective.distill.loss: dino``): the step's DINO loss against an equation
written here (Sinkhorn-Knopp targets of the frozen DINOv2 teacher's heads, cross-entropy of every student crop
against the other views' targets), the teacher frozen outside the optimizer and refused when it changed or does
not fit, and a 2-process ZeRO-3 run of the tiny recipe from a tiny DINOv2 teacher trained here: loss falls, a
killed run resumes bit-exactly, the student exports with timm / transformers parity."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.errors import BadInputError
from pretrain import checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.objectives import build_objective
from tests.conftest import REPO, TINY, metric_history, resume_after_kill, run_pretrain, train_teacher

pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO, "pretrain", "configs", "distill_dino_tiny_cpu.yaml")
TEACHER_RECIPE = os.path.join(REPO, "pretrain", "configs", "dinov2_tiny_cpu.yaml")
G2SD = os.path.join(REPO, "pretrain", "configs", "distill_g2sd_tiny_cpu.yaml")
STEPS = 8
STUDENT = [*TINY, "data.split_by=sample", "data.num_workers=0", "model.drop_path=0.0"]


@pytest.fixture(scope="module")
def teacher(xray_shards, tmp_path_factory):
    """A tiny DINOv2 (48 wide, 64 prototypes) trained 6 steps on 1 process: checkpoints at steps 3 and 6."""
    return train_teacher(tmp_path_factory, "dino_teacher", xray_shards, "model.embed_dim=48", "train.steps=6",
                         "checkpoint.every=3", "checkpoint.keep_last=2", recipe=TEACHER_RECIPE)


def objective_for(teacher, shards, *extra, recipe=RECIPE):
    return build_objective(load_config(recipe, [*STUDENT, f"objective.distill.teacher={teacher}",
                                                f"data.shards={shards}", *extra]))


def sinkhorn(logits, temperature, iterations=3):
    """Equipartition: every prototype gets mass 1/K, every sample 1/B, rows scaled to sum to 1."""
    q = torch.exp(logits / temperature)
    q = q / q.sum()
    samples, prototypes = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / prototypes
        q = q / q.sum(dim=1, keepdim=True) / samples
    return q * samples


def ema_teacher(teacher_run, shards):
    """The DINOv2 run's EMA teacher as its last checkpoint saved it, read without the distill code."""
    objective = build_objective(load_config(TEACHER_RECIPE, [*TINY, "model.embed_dim=48", f"data.shards={shards}"]))
    state = checkpoint.load_objective_state(os.path.join(teacher_run, "checkpoints", "step_000006"))
    objective.teacher.load_state_dict(state["teacher"])
    return objective.teacher.eval()


def test_dino_loss_is_cross_entropy_against_the_frozen_teachers_sinkhorn_targets(teacher, xray_shards):
    objective = objective_for(teacher, xray_shards, "objective.dinov2.ibot_loss_weight=0",
                              "objective.dinov2.koleo_loss_weight=0")
    gen = torch.Generator().manual_seed(0)
    batch = {"global_crops": torch.randn(3, 2, 1, 32, 32, generator=gen),
             "local_crops": torch.randn(3, 2, 1, 16, 16, generator=gen), "seed": torch.arange(3)}
    out = objective(objective.trainable(), batch, 0)
    out.loss.backward()
    d = objective.cfg.objective.dinov2
    globals_, locals_ = (batch[k].transpose(0, 1).flatten(0, 1) for k in ("global_crops", "local_crops"))
    ref = ema_teacher(teacher, xray_shards)
    with torch.no_grad():
        targets = sinkhorn(ref.dino_head(ref.encoder(globals_)[:, 0]), d.teacher_temp).chunk(2)
        student = objective.student
        logits = torch.cat([student.dino_head(student.encoder(x)[:, 0]) for x in (globals_, locals_)]).chunk(4)
    pairs = [-(targets[t] * torch.log_softmax(logits[s] / d.student_temp, -1)).sum(-1).mean()
             for s in range(4) for t in range(2) if s != t]
    expected = sum(pairs) / len(pairs)
    assert out.metrics["dino_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    trained = {id(p) for p in objective.trainable().parameters()}
    assert all(not p.requires_grad and p.grad is None and id(p) not in trained for p in objective.teacher.parameters())
    assert objective.trainable().dino_head.mlp[0].weight.grad is not None


def test_a_changed_or_unfit_teacher_is_refused_with_the_key(teacher, xray_shards):
    state = objective_for(teacher, xray_shards).state_dict()
    other = objective_for(os.path.join(teacher, "checkpoints", "step_000003"), xray_shards)
    with pytest.raises(ConfigError, match="not those this run was trained with"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="objective.dinov2.head_prototypes"):
        objective_for(teacher, xray_shards, "objective.dinov2.head_prototypes=32")
    with pytest.raises(ConfigError, match="patch size and channels"):
        objective_for(teacher, xray_shards, "model.patch_size=4")
    with pytest.raises(BadInputError, match="a dinov2 checkpoint; G2SD distils an MAE decoder.s features"):
        objective_for(teacher, xray_shards, recipe=G2SD)


@pytest.fixture(scope="module")
def run(teacher, xray_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill_dino"))
    args = dino_args(out, "z3", xray_shards, teacher)
    run_pretrain(args)
    return {"dir": os.path.join(out, "z3"), "out": out}


def dino_args(out, name, shards, teacher):
    return ["train", "--nproc", "2", "--config", RECIPE, *STUDENT, f"output_dir={out}", f"name={name}",
            f"data.shards={shards}", f"objective.distill.teacher={teacher}", "distributed.zero_stage=3",
            "distributed.zero3_persistence_threshold=0", f"train.steps={STEPS}", "checkpoint.every=4",
            "train.image_every=4"]


def test_zero3_run_learns_the_teachers_targets(run):
    losses = [value for _, value in metric_history(run["dir"], "dino_loss")]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert {value for _, value in metric_history(run["dir"], "teacher_momentum")} == {1.0}


def test_killed_run_resumes_exactly(run, teacher, xray_shards, tmp_path):
    args = dino_args(str(tmp_path), "killed", xray_shards, teacher)
    final = resume_after_kill(args, str(tmp_path / "killed"), run["dir"], 4, STEPS)
    saved = checkpoint.load_objective_state(final)
    assert set(saved) == {"teacher_fingerprint", "center", "patch_center"}


def test_student_exports_with_timm_and_transformers_parity(run, tmp_path):
    result = run_pretrain(["export", run["dir"], str(tmp_path / "bundle"), "--verify"])
    assert "parity with the training encoder" in result.stdout
    names = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert names["pos_embed"].shape[-1] == 32 and not any(
        n.startswith(("dino_head", "ibot_head", "mask_token", "encoder.")) for n in names)
    with open(tmp_path / "bundle" / "MODEL_CARD.md") as handle:
        assert "a new student, loss dino" in handle.read()


def test_full_size_recipe_runs_tiny_from_a_dinov2_teacher(teacher, xray_shards, tmp_path):
    run_pretrain(["train", "--config", os.path.join(REPO, "pretrain", "configs", "distill_vitg_to_vitb_xray.yaml"),
                  *STUDENT, f"output_dir={tmp_path}", "name=vitg_to_vitb", f"data.shards={xray_shards}",
                  f"objective.distill.teacher={teacher}", "data.batch_size=4", "distributed.precision=fp32",
                  "train.steps=2", "train.log_every=1"])
    assert len(metric_history(str(tmp_path / "vitg_to_vitb"), "dino_loss")) == 2
