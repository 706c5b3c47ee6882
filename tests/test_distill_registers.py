"""Post-hoc registers (``objective.distill.mode: registers``): the shifted and flipped views and their mapping back
against loops written here, the loss against the PH-Reg equation on targets built here by slicing, the student
as the teacher with more registers and only the unlocked parts trained, and a 2-process ZeRO-3 run of the tiny
recipe from a tiny MAE teacher trained here: loss falls, teacher and student probed, a killed run resumes
bit-exactly, the student exports with its registers (timm ``reg_tokens``) with timm / transformers parity and a
card naming the teacher, the teacher unchanged."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pretrain import teachers
from pretrain.config import ConfigError, load_config
from pretrain.objectives import build_objective
from pretrain.objectives.register_views import register_views, shift_flip_images, unshift_features
from tests.conftest import (REPO, TINY, metric_history, resume_after_kill, run_pretrain, train_teacher,
                            write_digits)

RECIPE = os.path.join(REPO, "pretrain", "configs", "distill_registers_tiny_cpu.yaml")
STEPS = 8
STUDENT = [*TINY, "model.num_registers=2", "data.split_by=sample", "data.num_workers=0", "objective.distill.views=3"]


def view_by_hand(image, dy, dx, flip, patch):
    """Move [C, H, W] by (dy, dx) patches, zeros entering, then mirror left-right."""
    out = torch.zeros_like(image)
    _, height, width = image.shape
    sy, sx = dy * patch, dx * patch
    out[:, max(sy, 0):height + min(sy, 0), max(sx, 0):width + min(sx, 0)] = \
        image[:, max(-sy, 0):height - max(sy, 0), max(-sx, 0):width - max(sx, 0)]
    return out.flip(-1) if flip else out


def unshift_by_hand(maps, views, grid):
    """maps [K, h, w, D] of one sample's views -> [h, w, D]: each patch the mean of the views that saw it."""
    height, width = grid
    out = torch.zeros(height, width, maps.shape[-1])
    for a in range(height):
        for b in range(width):
            seen = []
            for k, (dy, dx, flip) in enumerate(views.tolist()):
                row, col = a + dy, b + dx
                if 0 <= row < height and 0 <= col < width:
                    seen.append(maps[k, row, width - 1 - col if flip else col])
            out[a, b] = torch.stack(seen).mean(0)
    return out


def test_views_move_and_mirror_whole_patches_and_map_back_to_the_original_grid():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 2, 32, 24, generator=gen)
    views = register_views(torch.tensor([5, 6]), 5, 2)["register_views"]
    assert views.shape == (2, 5, 3) and not views[:, 0].any() and views[:, 1:, :2].abs().max() <= 2
    assert torch.equal(views, register_views(torch.tensor([5, 6]), 5, 2)["register_views"])
    shifted = shift_flip_images(images, views, 8)
    for b in range(2):
        for k in range(5):
            assert torch.equal(shifted[b * 5 + k], view_by_hand(images[b], *views[b, k].tolist(), 8))
    features = torch.randn(10, 12, 3, generator=gen)
    back = unshift_features(features, views, (4, 3))
    for b in range(2):
        expected = unshift_by_hand(features[b * 5:(b + 1) * 5].reshape(5, 4, 3, 3), views[b], (4, 3))
        assert torch.allclose(back[b].reshape(4, 3, 3), expected, atol=1e-6)
    means = F.avg_pool2d(shifted, 8).flatten(2).transpose(1, 2)  # a per-patch function that mirroring keeps
    assert torch.allclose(unshift_features(means, views, (4, 3)), F.avg_pool2d(images, 8).flatten(2).transpose(1, 2),
                          atol=1e-6)


@pytest.fixture(scope="module")
def teacher(xray_shards, tmp_path_factory):
    """A tiny MAE (32 wide, no registers) trained 6 steps on 1 process: checkpoints at steps 3 and 6."""
    return train_teacher(tmp_path_factory, "reg_teacher", xray_shards, "train.steps=6", "checkpoint.every=3",
                         "checkpoint.keep_last=2")


def objective_for(teacher, shards, *extra):
    return build_objective(load_config(RECIPE, [*STUDENT, f"objective.distill.teacher={teacher}",
                                                f"data.shards={shards}", *extra]))


def test_student_is_the_teacher_with_registers_and_trains_only_the_unlocked_parts(teacher, xray_shards):
    objective = objective_for(teacher, xray_shards)
    student, frozen = objective.encoder(), objective.teacher
    assert student.num_registers == 2 and frozen.num_registers == 0
    names = [n for n, _ in student.named_parameters()]
    trained = sorted(n for n, p in student.named_parameters() if p.requires_grad)
    assert "pos_embed" not in names  # MAE's fixed sin-cos table is a buffer: nothing to unlock
    assert trained == sorted(["reg_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
                             + [n for n in names if n.startswith("blocks.1.")])
    theirs = frozen.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in student.state_dict().items() if k != "reg_token")
    assert all(not p.requires_grad for p in frozen.parameters())


def test_loss_is_cosine_plus_mse_against_the_teachers_tokens_averaged_over_the_views(teacher, xray_shards):
    objective = objective_for(teacher, xray_shards)
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = {"image": images, "seed": torch.tensor([3, 4])}
    out = objective(objective.trainable(), batch, 0)
    out.loss.backward()
    views = objective.data_spec().masks.batch(batch["seed"])["register_views"]
    ref = teachers.encoder_teacher(teacher, 32)  # read again: the objective's teacher is not what is checked
    targets = []
    with torch.no_grad():
        for b in range(2):
            maps = torch.stack([ref(view_by_hand(images[b], *v.tolist(), 8)[None])[0, 1:] for v in views[b]])
            targets.append(unshift_by_hand(maps.reshape(3, 4, 4, -1), views[b], (4, 4)).reshape(16, -1))
        student = objective.encoder()
        mine = student(images)[:, student.num_prefix_tokens:]
    target = torch.stack(targets)
    expected = 1 - F.cosine_similarity(mine, target, dim=-1).mean() + ((mine - target) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert objective.encoder().reg_token.grad is not None and objective.encoder().norm.weight.grad is None
    assert {"high_norm_share", "teacher_high_norm_share", "cosine_loss", "mse_loss"} <= set(out.metrics)


def test_a_student_that_is_not_the_teacher_is_refused_naming_the_keys(teacher, xray_shards):
    with pytest.raises(ConfigError, match=r"model.embed_dim=32 \(not 48\)"):
        objective_for(teacher, xray_shards, "model.embed_dim=48")
    with pytest.raises(ConfigError, match="model.num_registers=0: mode=registers adds registers"):
        objective_for(teacher, xray_shards, "model.num_registers=0")
    with pytest.raises(ConfigError, match="unlock"):
        load_config(RECIPE, [*STUDENT, "objective.distill.unlock=[heads]"]).objective.distill.validate(None)


def registers_args(out, name, shards, teacher, *extra):
    return ["train", "--nproc", "2", "--config", RECIPE, *STUDENT, f"output_dir={out}", f"name={name}",
            f"data.shards={shards}", f"objective.distill.teacher={teacher}", "distributed.zero_stage=3",
            "distributed.zero3_persistence_threshold=0", f"train.steps={STEPS}", "checkpoint.every=4",
            "optim.lr=3e-3", *extra]


@pytest.fixture(scope="module")
def run(teacher, xray_shards, tmp_path_factory):
    """The recipe under ZeRO-3, probed on 200 of scikit-learn's digits at steps 0, 4 and 8 (the teacher once)."""
    from data_pipeline.writers import write_xray_shards

    before = teachers.encoder_teacher(teacher, 32)
    out = str(tmp_path_factory.mktemp("registers"))
    labels = write_digits(os.path.join(out, "raw_digits"), 200)
    write_xray_shards(os.path.join(out, "raw_digits"), os.path.join(out, "digits"), 100, progress=False, labels=labels)
    run_pretrain(registers_args(out, "z3", xray_shards, teacher, f"probe.shards={out}/digits", "probe.every=4",
                                "probe.linear_steps=50"))
    return {"dir": os.path.join(out, "z3"), "before": before}


@pytest.mark.slow
def test_zero3_run_learns_the_denoised_targets_and_leaves_the_teacher_unchanged(run, teacher):
    losses = [value for _, value in metric_history(run["dir"])]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert len(metric_history(run["dir"], "high_norm_share")) == STEPS
    assert [step for step, _ in metric_history(run["dir"], "probe_knn_acc")] == [0, 4, 8]
    assert [step for step, _ in metric_history(run["dir"], "teacher_probe_knn_acc")] == [0]  # frozen: once
    after = teachers.encoder_teacher(teacher, 32)
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert (after(images)[:, 0] - run["before"](images)[:, 0]).abs().max() <= 1e-6


@pytest.mark.slow
def test_killed_run_resumes_exactly(run, teacher, xray_shards, tmp_path):
    args = registers_args(str(tmp_path), "killed", xray_shards, teacher)
    resume_after_kill(args, str(tmp_path / "killed"), run["dir"], 4, STEPS)


@pytest.mark.slow
def test_student_exports_with_its_registers_and_timm_transformers_parity(run, tmp_path):
    result = run_pretrain(["export", run["dir"], str(tmp_path / "bundle"), "--verify"])
    assert "parity with the training encoder" in result.stdout
    weights = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert weights["reg_token"].shape == (1, 2, 32) and not any(n.startswith("encoder.") for n in weights)
    with open(tmp_path / "bundle" / "MODEL_CARD.md") as handle:
        card = handle.read()
    assert "post-hoc registers (2 in all)" in card and "teacher_high_norm_share" in card
    assert "probe_knn_acc" in card and "teacher_probe_knn_acc" in card


def test_full_size_recipe_runs_tiny_from_the_teacher(teacher, xray_shards, tmp_path):
    run_pretrain(["train", "--config", os.path.join(REPO, "pretrain", "configs", "registers_posthoc_vitb.yaml"),
                  *STUDENT, "model.layer_scale_init=0.0", f"output_dir={tmp_path}", "name=posthoc",
                  f"data.shards={xray_shards}", f"objective.distill.teacher={teacher}", "data.batch_size=4",
                  "distributed.precision=fp32", "train.steps=2", "train.log_every=1"])
    assert len(metric_history(str(tmp_path / "posthoc"))) == 2
