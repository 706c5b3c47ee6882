"""Stages of a run (train.stages): a DINOv2 run switching to larger global crops, a smaller batch and a lower lr
mid-run; resumed before and at the switch, exactly."""
import glob
import json
import os

import pytest
import torch
from PIL import Image

from data_pipeline.lineage import Lineage
from pretrain import checkpoint
from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.objectives import build_objective
from pretrain.optim import StepSchedule, step_lr
from pretrain.stages import Stages
from tests.conftest import REPO, TINY, metric_history, resume_after_kill, run_pretrain

RECIPE = os.path.join(REPO, "pretrain", "configs", "dinov2_tiny_cpu.yaml")
STEPS, SWITCH = 6, 4
STAGE = f"train.stages=[{{start: {SWITCH}, set: {{model.img_size: 48, data.batch_size: 2, optim.lr: 2e-4}}}}]"


def staged(*extra):
    return load_config(RECIPE, [*TINY, f"train.steps={STEPS}", STAGE, *extra])


def test_the_config_at_a_step_is_the_base_with_the_started_stages_applied():
    stages = Stages(staged())
    assert [stages.index(step) for step in range(STEPS + 1)] == [0, 0, 0, 0, 1, 1, 1]
    assert [stages.begins(step) for step in range(STEPS + 1)].count(True) == 1 and stages.begins(SWITCH)
    later = stages.config(SWITCH)
    assert (later.model.img_size, later.data.batch_size, later.optim.lr) == (48, 2, 2e-4)
    assert (stages.configs[0].model.img_size, stages.configs[0].data.batch_size) == (32, 8)
    assert later.train.stages == [] and later.model.depth == stages.configs[0].model.depth
    assert stages.describe(1) == "stage 1 from step 4: model.img_size=48, data.batch_size=2, optim.lr=0.0002"


def test_the_lr_table_follows_each_stage_settings():
    cfg = staged()
    stages = Stages(cfg)
    schedule = StepSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg.optim, STEPS,
                            stages.optim_at)
    assert schedule.lr[:SWITCH] == [step_lr(cfg.optim, step, STEPS) for step in range(SWITCH)]
    assert schedule.lr[SWITCH:] == [step_lr(stages.config(SWITCH).optim, step, STEPS) for step in range(SWITCH,
                                                                                                       STEPS + 1)]
    assert schedule.lr[SWITCH] == pytest.approx(2e-4 * schedule.lr[SWITCH - 1] / cfg.optim.lr, rel=0.5)


@pytest.mark.parametrize("stage, error", [
    ("[{start: 4, set: {model.depth: 4}}]", "model.depth cannot change in a stage"),
    ("[{start: 4, set: {optim.lr: 1e-4}}, {start: 4, set: {optim.lr: 1e-5}}]", "starts \\[4, 4\\] must increase"),
    ("[{start: 6, set: {optim.lr: 1e-4}}]", "each in 1..train.steps-1"),
    ("[{start: 4, set: {model.img_size: 50}}]", "train.stages\\[0\\] \\(from step 4\\): model.img_size=50 is not a "
                                                "multiple of model.patch_size=8"),
    ("[{start: 4, set: {data.batch_size: many}}]", "train.stages\\[0\\].set: data.batch_size='many'"),
    ("[{start: 4, set: {objective.dinov2.gram.weight: 1.0}}]", "a run without Gram anchoring"),
])
def test_a_bad_stage_is_refused_naming_it(stage, error):
    with pytest.raises(ConfigError, match=error):
        staged(f"train.stages={stage}")


def test_an_mae_run_keeps_its_input_size():
    with pytest.raises(ConfigError, match="model.img_size cannot change in a mae run"):
        load_config(None, [*TINY, "train.steps=6", "train.stages=[{start: 3, set: {model.img_size: 48}}]"])


def test_the_objective_takes_a_stage_crops_and_mask_grid():
    stages = Stages(staged())
    objective = build_objective(stages.configs[0])
    objective.reconfigure(stages.config(SWITCH))
    spec = objective.data_spec()
    assert spec.img_size == 48 and objective.ibot_draw.kwargs["grid"] == (6, 6)
    passes = {p.name: p.tokens for p in objective.token_passes()}
    prefix = objective.student.encoder.num_prefix_tokens
    assert passes["student global crops"] == prefix + 36 and passes["teacher global crops"] == prefix + 36


def run_args(out, name, shards):
    return ["train", "--nproc", "2", "--config", RECIPE, *TINY, f"output_dir={out}", f"name={name}",
            f"data.shards={shards}", "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=0",
            "distributed.zero_stage=2", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep_last=5",
            "train.image_every=2", STAGE]


@pytest.fixture(scope="module")
def staged_run(xray_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("staged"))
    run_pretrain(run_args(out, "whole", xray_shards))
    return os.path.join(out, "whole")


@pytest.mark.slow
def test_a_staged_run_switches_its_crops_batch_and_lr_at_the_start(staged_run):
    assert [int(v) for _, v in metric_history(staged_run, "stage")] == [0, 0, 0, 0, 1, 1]
    lr = dict(metric_history(staged_run, "lr"))
    assert lr[SWITCH + 1] < 1e-3 * 0.5  # the stage's lr (2e-4 peak) against the base's 1e-3
    merged = Lineage()
    for state in checkpoint.trainer_states(os.path.join(staged_run, "checkpoints", checkpoint.tag_for(STEPS))):
        merged.update(Lineage(state["lineage"]))
    assert merged.count == 2 * (4 * SWITCH + 2 * (STEPS - SWITCH))  # 4 a rank and step, then 2; none twice
    images = sorted(glob.glob(os.path.join(staged_run, "mlartifacts", "**", "attention_step_*.png"), recursive=True))
    widths = [Image.open(path).size[0] for path in images]  # crop | attention: crops of 32 px, then 48 px
    assert widths == [64, 64, 96]


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", [2, SWITCH], ids=["before-the-switch", "at-the-switch"])
def test_a_staged_run_resumed_before_or_at_the_switch_ends_with_the_same_weights(staged_run, xray_shards, tmp_path,
                                                                                 killed_at):
    args = run_args(str(tmp_path), "killed", xray_shards)
    resume_after_kill(args, os.path.join(str(tmp_path), "killed"), staged_run, killed_at, STEPS)
    assert metric_history(os.path.join(str(tmp_path), "killed"), "loss")[-1] == metric_history(staged_run)[-1]


def test_the_plan_of_a_staged_run_plans_each_stage(tmp_path):
    out = tmp_path / "plan.json"
    result = run_pretrain(["plan", "--config", RECIPE, *TINY, f"train.steps={STEPS}", STAGE, "--json", str(out)])
    assert "stage 0: the base config:" in result.stdout and "stage 1 from step 4: model.img_size=48" in result.stdout
    plans = json.load(open(out))["stages"]
    tokens = [{p["name"]: p["tokens"] for p in plan["passes"]}["student global crops"] for plan in plans]
    prefix = tokens[0] - 16  # a 4 x 4 grid of 8 px patches at 32 px, 6 x 6 at 48 px
    assert tokens == [prefix + 16, prefix + 36] and [plan["micro_batch"] for plan in plans] == [8, 2]
