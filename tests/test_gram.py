"""Gram anchoring (DINOv3) in the DINOv2 objective: the loss against the paper's equation written here, the
Gram teacher's crops, resizing and snapshot schedule, and a 2-process ZeRO-3 run killed and resumed exactly."""
import glob
import os

import numpy as np
import pytest
import torch

from data_pipeline.views import MultiCropView
from pretrain import checkpoint
from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.objectives import build_objective
from pretrain.objectives.base import DataSpec
from pretrain.objectives.gram import GramAnchor, gram_loss, resize_patches
from tests.conftest import (REPO, TINY, assert_same_weights, checkpoint_weights, metric_history, resume_after_kill,
                            run_pretrain)

RECIPE = os.path.join(REPO, "pretrain", "configs", "dinov2_tiny_cpu.yaml")
GRAM = ["objective.dinov2.gram.weight=2.0", "objective.dinov2.gram.start_step=2",
        "objective.dinov2.gram.refresh_every=2", "objective.dinov2.gram.max_refreshes=1"]
STEPS = 8


def gram_reference(student: np.ndarray, teacher: np.ndarray, remove_neg: bool = False) -> float:
    """DINOv3's L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2 per image, rows of X L2-normalised, averaged over the
    images and the P x P entries, written out with loops."""
    total, count = 0.0, 0
    for xs, xg in zip(student.astype(np.float64), teacher.astype(np.float64)):
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        xg = xg / np.linalg.norm(xg, axis=1, keepdims=True)
        for i in range(len(xs)):
            for j in range(len(xs)):
                s, g = xs[i] @ xs[j], xg[i] @ xg[j]
                if remove_neg:
                    s, g = max(s, 0.0), max(g, 0.0)
                total += (s - g) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_is_the_papers_equation(remove_neg):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 6, 5)), rng.normal(size=(3, 6, 7))  # the widths may differ
    value = gram_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32),
                      remove_neg)
    assert value.item() == pytest.approx(gram_reference(student, teacher, remove_neg), rel=1e-5)
    same = torch.tensor(student, dtype=torch.float32)
    assert gram_loss(same, same * torch.rand(3, 6, 1) * 5).item() == pytest.approx(0.0, abs=1e-6)  # row scale
    assert gram_loss(same, same @ torch.linalg.qr(torch.randn(5, 5))[0]).item() == pytest.approx(0.0, abs=1e-6)


def test_gram_loss_gives_the_teacher_no_gradient():
    student, teacher = torch.randn(2, 4, 3, requires_grad=True), torch.randn(2, 4, 3, requires_grad=True)
    gram_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_teacher_features_are_resized_onto_the_students_grid_in_order():
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    tokens = torch.stack([rows.flatten(), cols.flatten()], dim=1)[None]  # [1, 64, 2]: (row, column) per patch
    small = resize_patches(tokens, (8, 8), (4, 4)).reshape(4, 4, 2)
    assert torch.all(small[1:, :, 0] > small[:-1, :, 0]) and torch.allclose(small[:, :1, 0], small[:, :, 0])
    assert torch.all(small[:, 1:, 1] > small[:, :-1, 1]) and torch.allclose(small[:1, :, 1], small[:, :, 1])
    assert resize_patches(tokens, (8, 8), (8, 8)) is tokens


def test_gram_crops_are_the_global_boxes_undistorted_and_leave_the_other_crops_as_drawn():
    cfg = load_config(RECIPE, TINY)
    spec = DataSpec(kind="multicrop", img_size=32, in_chans=1, local_crops=2, local_size=16)
    gram_spec = DataSpec(**{**spec.__dict__, "gram_size": 64})
    image = torch.rand(1, 80, 72)
    plain = MultiCropView(spec, cfg.data.transforms, "xray")(image, torch.Generator().manual_seed(3), "x")
    view = MultiCropView(gram_spec, cfg.data.transforms, "xray")
    made = view(image, torch.Generator().manual_seed(3), "x")
    assert torch.equal(made["global_crops"], plain["global_crops"])
    assert torch.equal(made["local_crops"], plain["local_crops"])
    choices = view.draw(image.shape, torch.Generator().manual_seed(3))
    for (crop, ops), (gram_crop, no_ops) in zip(choices["global_crops"], choices["gram_crops"]):
        assert gram_crop == crop._replace(size=64) and no_ops == [] and ops != []
    assert made["gram_crops"].shape == (2, 1, 64, 64)


def tiny_gram(*extra):
    return load_config(RECIPE, [*TINY, *GRAM, "train.steps=10", *extra])


def test_snapshots_follow_the_schedule_and_the_ema_teacher():
    objective = build_objective(tiny_gram())
    anchor, ema = objective.gram, objective.teacher.encoder
    assert [anchor.due(step) for step in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]  # max_refreshes=1
    first = anchor.encoder.patch_embed.proj.weight
    for step in range(8):
        with torch.no_grad():
            ema.patch_embed.proj.weight.fill_(float(step))  # the EMA teacher as it is when step `step` begins
        anchor.catch_up(step)
        assert anchor.active(step) == (step >= 2)
        expected = {0: None, 1: None, 2: 2.0, 3: 2.0}.get(step, 4.0)
        if expected is not None:
            assert torch.all(anchor.encoder.patch_embed.proj.weight == expected), step
    assert anchor.encoder.patch_embed.proj.weight is first  # copied into, not replaced
    assert not any(p.requires_grad for p in anchor.encoder.parameters())
    assert objective.data_spec().gram_size == 64
    assert anchor.encoder in objective.frozen() and anchor.encoder in objective.models()
    names = [p.name for p in objective.token_passes()]
    assert "Gram teacher global crops" in names


def test_the_loss_is_zero_when_the_gram_teacher_is_the_student_on_the_same_crops():
    """A Gram teacher taken at step 0 (the EMA teacher is then the student) on the student's own global crops at
    its side: the objective's Gram loss vanishes; on other crops, or the same ones in another order, it does not."""
    objective = build_objective(tiny_gram("objective.dinov2.gram.start_step=0", "objective.dinov2.gram.teacher_scale=1",
                                          "objective.dinov2.ibot_loss_weight=0", "model.drop_path=0"))
    crops = torch.randn(3, 2, 1, 32, 32)
    batch = {"global_crops": crops, "local_crops": torch.randn(3, 2, 1, 16, 16), "seed": torch.arange(3)}

    def gram(gram_crops):
        return objective(objective.student, {**batch, "gram_crops": gram_crops}, 0).metrics["gram_loss"].item()

    assert gram(crops) == pytest.approx(0.0, abs=1e-10)
    assert gram(crops.flip(1)) > 1e-4 and gram(torch.randn_like(crops)) > 1e-4


def test_a_loaded_gram_teacher_counts_as_the_first_and_bad_settings_are_refused(tmp_path):
    cfg = tiny_gram()
    loaded = build_objective(cfg).teacher.encoder
    anchor = GramAnchor(cfg, build_objective(cfg).teacher.encoder, loaded)
    assert anchor.taken == 1 and anchor.encoder is loaded
    anchor.catch_up(2)  # the first Gram teacher is the loaded one
    assert anchor.taken == 1
    with pytest.raises(ConfigError, match="teacher_scale=1.1"):
        tiny_gram("objective.dinov2.gram.teacher_scale=1.1")
    with pytest.raises(ConfigError, match="needs objective.dinov2.gram.refresh_every"):
        tiny_gram("objective.dinov2.gram.refresh_every=0")
    with pytest.raises(Exception, match="objective.dinov2.gram.teacher: no such file"):
        build_objective(tiny_gram(f"objective.dinov2.gram.teacher={tmp_path / 'nothing'}"))
    dino_distill = os.path.join(REPO, "pretrain", "configs", "distill_dino_tiny_cpu.yaml")
    with pytest.raises(ConfigError, match="a distillation's teacher is frozen already"):
        build_objective(load_config(dino_distill, [*GRAM, f"objective.distill.teacher={tmp_path}"]))


def gram_args(out, name, shards, *extra):
    return ["train", "--nproc", "2", "--config", RECIPE, f"output_dir={out}", f"name={name}", f"data.shards={shards}",
            "data.batch_size=4", "data.num_workers=1", "distributed.zero_stage=3",
            "distributed.zero3_persistence_threshold=0", f"train.steps={STEPS}", "checkpoint.every=4",
            "train.image_every=4", *GRAM, *extra]


@pytest.fixture(scope="module")
def gram_run(xray_shards, tmp_path_factory):
    """The tiny DINOv2 recipe with Gram anchoring from step 2 (refreshed at 4) on 2 processes under ZeRO-3."""
    out = str(tmp_path_factory.mktemp("gram"))
    run_pretrain(gram_args(out, "whole", xray_shards))
    return os.path.join(out, "whole")


@pytest.mark.slow
def test_gram_loss_starts_at_its_step_and_the_snapshot_is_in_the_checkpoint(gram_run):
    losses = dict(metric_history(gram_run, "gram_loss"))
    weights = dict(metric_history(gram_run, "gram_weight"))
    assert [losses[s] for s in (1, 2)] == [0.0, 0.0] and all(losses[s] > 0 for s in range(3, STEPS + 1))
    assert [weights[s] for s in (1, 2, 3)] == [0.0, 0.0, 2.0]
    state = checkpoint.load_objective_state(os.path.join(gram_run, "checkpoints", f"step_{STEPS:06d}"))
    assert state["gram_taken"] == 2
    teacher = {k[len("encoder."):]: v for k, v in state["teacher"].items() if k.startswith("encoder.")}
    assert set(state["gram_teacher"]) == set(teacher)
    assert any(not torch.equal(state["gram_teacher"][k], teacher[k]) for k in teacher)  # the EMA moved on
    images = glob.glob(os.path.join(gram_run, "mlartifacts", "**", "patch_similarity_step_*.png"), recursive=True)
    assert len(images) == 2


@pytest.mark.slow
def test_killed_gram_run_resumes_exactly_across_a_refresh(gram_run, xray_shards, tmp_path):
    """Killed after the checkpoint at step 4, whose next step retakes the Gram teacher."""
    args = gram_args(str(tmp_path), "killed", xray_shards)
    final = resume_after_kill(args, os.path.join(str(tmp_path), "killed"), gram_run, 4, STEPS)
    whole = checkpoint.load_objective_state(os.path.join(gram_run, "checkpoints", f"step_{STEPS:06d}"))
    resumed = checkpoint.load_objective_state(final)
    assert_same_weights(whole["gram_teacher"], resumed["gram_teacher"])
    assert_same_weights(whole["teacher"], resumed["teacher"])
    assert metric_history(os.path.join(str(tmp_path), "killed"), "gram_loss")[-1] == \
        metric_history(gram_run, "gram_loss")[-1]
    assert checkpoint_weights(final)
