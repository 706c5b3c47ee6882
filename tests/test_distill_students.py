"""Several distillation students in one job: one teacher pass per batch, each student on its own group of ranks
with its own engine, checkpoint folder, metrics and export (pretrain/objectives/distill_students.py)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pretrain import teachers
from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.objectives import build_objective
from pretrain.objectives.distill_students import student_config, student_groups
from pretrain.objectives.masking import mae_noise
from pretrain.students import saved_students
from tests.conftest import REPO, metric_history, resume_after_kill, run_pretrain, train_teacher, write_digits

RECIPE = os.path.join(REPO, "pretrain", "configs", "distill_students_tiny_cpu.yaml")
STEPS = 8
SMALL = ["model.img_size=32", "optim.warmup_steps=2", "optim.lr=2e-3", "data.shuffle_buffer=16",
         "data.num_workers=0", "model.depth=2", "objective.distill.decoder_dim=16", "objective.distill.decoder_heads=2"]


@pytest.fixture(scope="module")
def teacher(xray_shards, tmp_path_factory):
    """A tiny MAE (48 wide, one decoder block) trained 4 steps on 1 process."""
    return train_teacher(tmp_path_factory, "students_teacher", xray_shards, "model.embed_dim=48", "train.steps=4",
                         "checkpoint.every=4")


def config(teacher, shards, *extra):
    return load_config(RECIPE, [*SMALL, f"objective.distill.teacher={teacher}", f"data.shards={shards}", *extra])


def args(out, name, shards, teacher, *extra, nproc=2):
    return ["train", "--nproc", str(nproc), "--config", RECIPE, *SMALL, f"output_dir={out}", f"name={name}",
            f"data.shards={shards}", f"objective.distill.teacher={teacher}", f"train.steps={STEPS}",
            "checkpoint.every=4", *extra]


def test_groups_split_the_ranks_one_group_per_student_and_one_process_holds_them_all():
    assert student_groups(2, 1) == [[0], [0]]
    assert student_groups(2, 2) == [[0], [1]]
    assert student_groups(2, 4) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="multiple of the students"):
        student_groups(2, 3)


def test_a_student_entry_changes_its_model_only_and_is_checked(teacher, xray_shards):
    cfg = config(teacher, xray_shards)
    small = student_config(cfg, {"name": "vits", "size": "S"})
    assert (small.model.size, small.model.embed_dim, small.model.depth) == ("S", None, None)  # the preset's widths
    assert small.model.img_size == cfg.model.img_size and small.objective.distill.students == []
    assert small.name == f"{cfg.name}-vits"
    with pytest.raises(ConfigError, match=r"students\[wide\].*img_size"):
        student_config(cfg, {"name": "wide", "img_size": 64})
    with pytest.raises(ConfigError, match=r"students\[odd\]"):
        student_config(cfg, {"name": "odd", "embd_dim": 64})
    with pytest.raises(ConfigError, match="loss g2sd or feature"):
        config(teacher, xray_shards, "objective.distill.loss=dino").objective.distill.validate(cfg)
    with pytest.raises(ConfigError, match="distinct"):
        config(teacher, xray_shards, "objective.distill.students=[{name: a},{name: a}]").objective.distill.validate(
            cfg)


def test_one_process_shares_one_teacher_and_one_teacher_pass_between_its_students(teacher, xray_shards):
    objective = build_objective(config(teacher, xray_shards))
    local = objective.local_students()
    assert [name for name, *_ in local] == ["narrow", "wide"]
    assert all(student.teacher is objective.teacher for _, student, *_ in local)  # one copy in memory
    passes = []  # the teacher's passes: its encoder's first block runs once in each
    objective.teacher.encoder.blocks[0].register_forward_hook(lambda *_: passes.append(1))
    with teachers.sharing():
        assert teachers.mae_teacher(teacher) is teachers.mae_teacher(teacher)
    seeds = torch.tensor([1, 2, 3])
    batch = {"image": torch.randn(3, 1, 32, 32), "seed": seeds, "mae_noise": mae_noise(seeds, 16)["mae_noise"]}
    shared = objective.share(batch)
    outs = [student(student.trainable(), shared, 0) for _, student, *_ in local]
    assert all(math.isfinite(out.loss.item()) for out in outs)
    assert len(passes) == 1
    assert objective.take_counts() == {"teacher_passes": 1, "teacher_samples": 3, "student_samples": 3}
    alone = local[0][1](local[0][1].trainable(), batch, 0)  # a student on its own passes the teacher itself
    assert len(passes) == 2 and torch.allclose(alone.loss, outs[0].loss)


@pytest.fixture(scope="module")
def runs(teacher, xray_shards, tmp_path_factory):
    """The recipe on 2 processes under ZeRO-3 (a student each), probed on 100 digits at the end; and on 1
    process under ZeRO-2 (both students in turn), 4 steps."""
    from data_pipeline.writers import write_xray_shards

    out = str(tmp_path_factory.mktemp("students"))
    labels = write_digits(os.path.join(out, "raw_digits"), 100)
    write_xray_shards(os.path.join(out, "raw_digits"), os.path.join(out, "digits"), 100, progress=False, labels=labels)
    run_pretrain(args(out, "two", xray_shards, teacher, "distributed.zero_stage=3", f"probe.shards={out}/digits",
                      "probe.linear_steps=20"))
    run_pretrain(args(out, "one", xray_shards, teacher, "distributed.zero_stage=2", "train.steps=4", nproc=1))
    return {"two": os.path.join(out, "two"), "one": os.path.join(out, "one"), "out": out}


@pytest.mark.slow
def test_two_processes_pass_the_teacher_once_per_batch_and_each_student_learns_from_all_of_it(runs):
    run = runs["two"]
    global_batch = 2 * 8  # 2 processes x data.batch_size
    assert [value for _, value in metric_history(run, "teacher_passes_per_step")] == [2.0] * STEPS  # once a rank
    assert [value for _, value in metric_history(run, "teacher_samples_per_step")] == [global_batch] * STEPS
    for name in ("narrow", "wide"):
        assert [value for _, value in metric_history(run, f"{name}/samples_per_step")] == [global_batch] * STEPS
        losses = [value for _, value in metric_history(run, f"{name}/loss")]
        assert len(losses) == STEPS and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, (name, losses)
        assert [step for step, _ in metric_history(run, f"{name}/probe_knn_acc")] == [STEPS]
    assert metric_history(run, "narrow/loss") != metric_history(run, "wide/loss")
    assert [step for step, _ in metric_history(run, "teacher_probe_knn_acc")] == [STEPS]
    final = os.path.join(run, "checkpoints", f"step_{STEPS:06d}")
    assert saved_students(final) == ["narrow", "wide"]


@pytest.mark.slow
def test_one_process_trains_both_students_in_turn_on_the_same_batch(runs):
    run = runs["one"]
    assert [value for _, value in metric_history(run, "teacher_passes_per_step")] == [1.0] * 4
    for name in ("narrow", "wide"):
        assert [value for _, value in metric_history(run, f"{name}/samples_per_step")] == [8.0] * 4
        assert all(math.isfinite(value) for _, value in metric_history(run, f"{name}/loss"))


@pytest.mark.slow
def test_killed_two_student_run_resumes_exactly(runs, teacher, xray_shards, tmp_path):
    resume_after_kill(args(str(tmp_path), "two", xray_shards, teacher, "distributed.zero_stage=3",
                           f"probe.shards={runs['out']}/digits", "probe.linear_steps=20"),
                      os.path.join(str(tmp_path), "two"), runs["two"], 4, STEPS)


@pytest.mark.slow
def test_each_student_exports_on_its_own_and_loads_with_parity(runs, tmp_path):
    result = run_pretrain(["export", runs["two"], str(tmp_path / "bundles"), "--verify"])
    assert result.stdout.count("parity with the training encoder") == 2, result.stdout
    widths = {}
    for name in ("narrow", "wide"):
        with open(tmp_path / "bundles" / name / "config.json") as handle:
            widths[name] = json.load(handle)["pretrain_model"]["embed_dim"]
        with open(tmp_path / "bundles" / name / "MODEL_CARD.md") as handle:
            card = handle.read()
        assert f"students/{name}" in card and "teacher `" in card
    assert widths == {"narrow": 32, "wide": 48}
    refused = run_pretrain(["export", runs["two"], "--student", "nobody"], check=False)
    assert refused.returncode != 0 and "no student 'nobody'" in refused.stderr
