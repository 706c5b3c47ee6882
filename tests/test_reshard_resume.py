"""Resume on another process count under ZeRO 1, 2 and 3 (fp32, and ZeRO-3 in bf16; CPU, gloo), through the
real trainer.

Each stage's run is saved on 2 processes (a tiny MAE ViT whose optimizer has weight-decay / no-decay and
layer-decay groups) and resumed with ``checkpoint.resume=auto`` on 1 and on 3 processes, which converts the
checkpoint to DeepSpeed's universal format once and loads it. The runs go through the trainer of this file's
``__main__`` (started under torchrun): the product's Trainer, which also writes what its DeepSpeed engine
holds, gathered over the ranks, right after each checkpoint and right after the resume: every parameter's
fp32 master and Adam moments, the Adam steps, the engine's and the schedule's step, every group's
hyperparameters.

The data: 48 samples in 6 shards, no shuffle buffer. 2 processes x 3 readers x 4 samples read 24 in 3 steps;
the resumes read the other 24 of the pass in 4 steps (1 x 6, 3 x 2 a step), so at step 7 the lineage holds all
48 exactly when no sample was read twice or skipped.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from data_pipeline.lineage import Lineage
from pretrain import checkpoint
from tests.conftest import REPO, TINY, metric_history, run_pretrain

pytestmark = pytest.mark.slow

SAVED_AT, STEPS = 3, 7
COMMON = ["data.shuffle_buffer=0", f"train.steps={STEPS}", f"checkpoint.every={SAVED_AT}", "checkpoint.keep_last=5",
          "train.log_every=1", "tracking.system_metrics=false", "optim.layer_decay=0.75",
          "distributed.zero3_persistence_threshold=0"]
LAYOUTS = {2: ["data.batch_size=4", "data.num_workers=3"], 1: ["data.batch_size=6", "data.num_workers=0"],
           3: ["data.batch_size=2", "data.num_workers=0"]}
"""Per process count: the micro-batch and readers (the saving run's 6 readers deal evenly to 1 and to 3)."""
HYPER = ("lr", "weight_decay", "lr_scale", "wd_scale")


def gathered_state(trainer) -> dict:
    """What the trainer's engine holds, gathered over the ranks (collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.engine
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8, ZeRO-1/2: the links from parameters to their optimizer-state fragments are made once,
        # after the first group's first step, when groups 1.. have no state yet: made again to read them all
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, param in engine.module.named_parameters():
        state["fp32"][name] = safe_get_full_fp32_param(param).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][name] = safe_get_full_optimizer_state(param, key).detach().clone()
    base = engine.optimizer.optimizer
    state["adam_steps"] = sorted({int(s["step"]) for s in base.state.values() if "step" in s})
    state["groups"] = [{key: group[key] for key in HYPER} for group in base.param_groups]
    state.update(global_steps=engine.global_steps, schedule_step=trainer.scheduler.last_epoch, step=trainer.step)
    return state


def probe(argv: list) -> int:
    """Train with ``argv``'s overrides, writing <run>/probe/saved_<step>.pt after each checkpoint and
    <run>/probe/loaded_<step>.pt after a resume (the state loaded)."""
    from pretrain import dist
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    class ProbedTrainer(Trainer):
        def dump(self, kind: str) -> None:
            state = gathered_state(self)
            if dist.is_main():
                os.makedirs(os.path.join(self.run_dir, "probe"), exist_ok=True)
                torch.save(state, os.path.join(self.run_dir, "probe", f"{kind}_{self.step}.pt"))

        def _save(self) -> str:
            path = super()._save()
            self.dump("saved")
            return path

    trainer = ProbedTrainer(load_config(None, argv))
    if trainer.step:
        trainer.dump("loaded")
    try:
        trainer.train()
    finally:
        dist.destroy()
    return 0


def train(out: str, name: str, shards: str, nproc: int, *extra) -> str:
    """Run :func:`probe` on ``nproc`` processes (torchrun); returns its stderr."""
    args = TINY + COMMON + LAYOUTS[nproc] + [f"output_dir={out}", f"name={name}", f"data.shards={shards}", *extra]
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             os.path.abspath(__file__), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result.stderr


@pytest.fixture(scope="module")
def runs(xray_shards, tmp_path_factory):
    """``runs(stage, world, precision)``: the run folder of a stage's run saved on 2 processes (``world`` 2) or
    of its copy resumed from step 3 on ``world`` processes, and its stderr; each made once."""
    out = str(tmp_path_factory.mktemp("reshard"))
    made: dict = {}

    def get(stage: int, world: int, precision: str = "fp32"):
        key = (stage, world, precision)
        if key not in made:
            name = f"z{stage}_{precision}_on{world}"
            settings = [f"distributed.zero_stage={stage}", f"distributed.precision={precision}"]
            if world == 2:
                made[key] = (os.path.join(out, name), train(out, name, xray_shards, 2, *settings))
            else:
                saved = get(stage, 2, precision)[0]
                shutil.copytree(saved, os.path.join(out, name), ignore=shutil.ignore_patterns("probe"))
                for step in range(SAVED_AT + 1, STEPS + 1):  # the copy's newest checkpoint: step 3's
                    shutil.rmtree(os.path.join(out, name, "checkpoints", checkpoint.tag_for(step)), ignore_errors=True)
                made[key] = (os.path.join(out, name), train(out, name, xray_shards, world, *settings,
                                                            "checkpoint.resume=auto"))
        return made[key]

    return get


CASES = [pytest.param(stage, world, "fp32", id=f"zero{stage}-2to{world}") for stage in (1, 2, 3) for world in (1, 3)]
CASES.append(pytest.param(3, 3, "bf16", id="zero3-bf16-2to3"))  # bf16 weights and reduction, fp32 masters


def probed(run_dir: str, kind: str) -> dict:
    return torch.load(os.path.join(run_dir, "probe", f"{kind}_{SAVED_AT}.pt"), weights_only=False)


@pytest.mark.parametrize("stage, world, precision", CASES)
def test_loaded_masters_moments_steps_and_groups_equal_the_saved_ones(runs, stage, world, precision):
    """After the resume the gathered fp32 masters and Adam moments equal those at the save, bit for bit; the
    Adam, engine, schedule and trainer steps are the saved step's; every group keeps its own lr, weight decay,
    lr_scale and wd_scale (DeepSpeed 0.19.8 gives ZeRO-3 groups group 0's unless repaired)."""
    run_dir, stderr = runs(stage, world, precision)
    saved, loaded = probed(runs(stage, 2, precision)[0], "saved"), probed(run_dir, "loaded")
    assert "through its universal checkpoint" in stderr and "the global batch is now" in stderr
    assert f"ZeRO-{stage}, {precision}, world {world}" in stderr
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        assert sorted(loaded[kind]) == sorted(saved[kind])
        for name, tensor in saved[kind].items():
            assert torch.equal(loaded[kind][name], tensor), f"{kind} of {name}"
        assert any(tensor.abs().sum() > 0 for tensor in loaded[kind].values())
    assert loaded["adam_steps"] == saved["adam_steps"] == [SAVED_AT]
    for key in ("global_steps", "schedule_step", "step"):
        assert loaded[key] == saved[key] == SAVED_AT, key
    assert loaded["groups"] == saved["groups"]
    assert len({(g["lr_scale"], g["wd_scale"]) for g in saved["groups"]}) > 4  # layer decay x weight decay


@pytest.mark.parametrize("stage, world, precision", CASES)
def test_training_goes_on_at_the_saved_step_reading_the_rest_of_the_pass_once(runs, stage, world, precision):
    """Steps 4-7 log the uninterrupted schedule's lr (each step twice: the saved run's, copied, and the
    resumed one's) and finite losses; the lineage at step 7 holds each of the 48 samples once; the Adam
    steps at step 7 are 7."""
    run_dir, _ = runs(stage, world, precision)
    saved = runs(stage, 2, precision)[0]
    uninterrupted = metric_history(saved, "lr")
    assert metric_history(run_dir, "lr") == sorted(uninterrupted + [m for m in uninterrupted if m[0] > SAVED_AT])
    losses = [value for step, value in metric_history(run_dir, "loss") if step > SAVED_AT]
    assert len(losses) == 2 * (STEPS - SAVED_AT) and all(math.isfinite(value) for value in losses)
    final = os.path.join(run_dir, "checkpoints", checkpoint.tag_for(STEPS))
    states = checkpoint.trainer_states(final)
    assert len(states) == world
    merged = Lineage()
    for state in states:
        merged.update(Lineage(state["lineage"]))
    assert sum(end - start for spans in merged.ranges.values() for start, end in spans) == 48  # 24 + 24 consumed
    assert checkpoint.is_complete(os.path.join(run_dir, "checkpoints", checkpoint.tag_for(SAVED_AT), "universal"))
    # every Adam state counted each step once (ZeRO-3's loader shares one step tensor unless repaired: 3 + 4 x K)
    assert torch.load(os.path.join(run_dir, "probe", f"saved_{STEPS}.pt"), weights_only=False)["adam_steps"] == [STEPS]


def test_conversion_runs_once_and_a_cut_short_one_is_redone(runs, tmp_path, caplog):
    """`pretrain checkpoint convert` writes the universal folder with its marker; converting again finds it; a
    folder without a marker (a killed conversion) is deleted and converted again."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(runs(2, 2)[0], run_dir)
    step3 = os.path.join(run_dir, "checkpoints", checkpoint.tag_for(SAVED_AT))
    assert "resumes on any process count" in run_pretrain(["checkpoint", "convert", step3]).stdout
    universal = os.path.join(step3, "universal")
    assert checkpoint.completed_step(universal) == SAVED_AT
    assert not os.path.exists(os.path.join(step3, "latest_universal"))
    caplog.set_level(logging.INFO, logger="pretrain.checkpoint")
    assert checkpoint.convert(step3) == universal and "converted already" in caplog.text
    os.remove(os.path.join(universal, "COMPLETE"))
    leftover = os.path.join(universal, "zero", "leftover_model_states.pt")
    with open(leftover, "wb") as handle:
        handle.write(b"cut short")
    caplog.clear()
    checkpoint.convert(step3)
    assert "converted already" not in caplog.text and checkpoint.is_complete(universal)
    assert not os.path.exists(leftover) and checkpoint.completed_step(universal) == SAVED_AT


def test_a_regrouped_optimizer_is_refused(runs, xray_shards, tmp_path):
    """Without layer decay the optimizer has other groups: the universal loader, which restores the state group
    by group, would load it silently into the wrong ones; the resume stops with a clear error instead."""
    run_dir = str(tmp_path / "regrouped")
    shutil.copytree(runs(1, 2)[0], run_dir)
    result = run_pretrain(["train", *TINY, *COMMON, *LAYOUTS[1], f"output_dir={tmp_path}", "name=regrouped",
                           f"data.shards={xray_shards}", "distributed.zero_stage=1", "optim.layer_decay=1.0"],
                          check=False)
    assert result.returncode == 2 and "groups its parameters otherwise than this run's" in result.stderr


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pretrain import dist

    sys.exit(dist.leave(probe(sys.argv[1:])))
