"""The memory planner: model-state arithmetic per ZeRO stage, the activation estimate against the bytes autograd
really keeps at small sizes (within 25%), and `pretrain plan` / `pretrain submit` warnings."""
import json
import os

import pytest
import torch

from pretrain.config import load_config
from pretrain.objectives import build_objective
from pretrain.plan import GiB, activation_bytes, model_state_bytes, saved_activation_bytes, token_passes
from tests.conftest import REPO, run_pretrain

CONFIGS = os.path.join(REPO, "pretrain", "configs")
CASES = {
    "mae_tiny": ("mae_tiny_cpu", []),
    "mae_tiny_checkpointed": ("mae_tiny_cpu", ["model.activation_checkpointing=1"]),
    "mae_vit_s_64px": ("mae_vit_xray", ["model.size=S", "model.img_size=64"]),
    "mae_vit_s_every_2nd_block": ("mae_vit_xray", ["model.size=S", "model.img_size=128",
                                                   "model.activation_checkpointing=2"]),
    "dinov2_tiny": ("dinov2_tiny_cpu", []),
    "dinov2_tiny_checkpointed": ("dinov2_tiny_cpu", ["model.activation_checkpointing=1"]),
    "dinov2_vit_s_swiglu": ("dinov2_vit_xray", ["model.size=S", "model.img_size=56", "model.ffn=swiglu",
                                                "objective.dinov2.local_crops_size=28",
                                                "objective.dinov2.head_prototypes=4096"]),
    "dinov2_pathology_small": ("dinov2_vitl_pathology", [
        "model.embed_dim=64", "model.num_heads=4", "model.depth=3", "model.img_size=64",
        "objective.dinov2.head_prototypes=1024", "objective.dinov2.ibot_prototypes=1024",
        "objective.dinov2.local_crops_size=32"]),
}


def synthetic_batch(spec, size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    if spec.kind == "single":
        return {"image": torch.randn(size, spec.in_chans, spec.img_size, spec.img_size, generator=generator),
                "seed": torch.arange(size)}
    return {"global_crops": torch.randn(size, 2, spec.in_chans, spec.img_size, spec.img_size, generator=generator),
            "local_crops": torch.randn(size, spec.local_crops, spec.in_chans, spec.local_size, spec.local_size,
                                       generator=generator),
            "seed": torch.arange(size)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_estimate_is_within_25_percent_of_what_autograd_keeps(case):
    recipe, overrides = CASES[case]
    cfg = load_config(os.path.join(CONFIGS, f"{recipe}.yaml"), overrides + ["distributed.precision=fp32"])
    objective = build_objective(cfg)
    module = objective.trainable().train()
    batch = 8
    with saved_activation_bytes(module) as measured:
        objective(module, synthetic_batch(objective.data_spec(), batch), 0)
        kept = measured()
    estimate = activation_bytes(token_passes(objective), batch, 4)
    assert 0.75 <= estimate / kept <= 1.25, f"{case}: estimate {estimate / 2**20:.2f} MiB, kept {kept / 2**20:.2f} MiB"


def test_model_states_shard_with_the_zero_stage():
    million = 10**6
    full = model_state_bytes(million, 0, 0, 8, bf16=True, offload_optimizer=False)
    assert (full["parameters"], full["gradients"], full["optimizer"]) == (2e6, 2e6, 12e6)
    z1 = model_state_bytes(million, 0, 1, 8, bf16=True, offload_optimizer=False)
    assert (z1["parameters"], z1["gradients"], z1["optimizer"]) == (2e6, 2e6, 1.5e6)
    z3 = model_state_bytes(million, million, 3, 8, bf16=False, offload_optimizer=True)  # gradients leave with them
    assert (z3["parameters"], z3["gradients"], z3["optimizer"], z3["teacher"]) == (5e5, 0.0, 0.0, 4e6)
    z2 = model_state_bytes(million, 0, 2, 8, bf16=True, offload_optimizer=False)
    assert (z2["parameters"], z2["gradients"], z2["optimizer"]) == (2e6, 2.5e5, 1.5e6)
    infinity = model_state_bytes(million, 0, 3, 8, bf16=True, offload_optimizer=True, offload_param=True)
    assert (infinity["parameters"], infinity["gradients"], infinity["optimizer"]) == (0.0, 0.0, 0.0)
    held = model_state_bytes(million, 0, 3, 8, bf16=True, offload_optimizer=False, held=3 * million)  # locked weights
    assert (held["parameters"], held["gradients"], held["optimizer"]) == (1e6, 2.5e5, 1.5e6)
    shared = model_state_bytes(million, 3 * million, 2, 8, bf16=True, offload_optimizer=False, partitioned=2 * million)
    assert shared["teacher"] == million * 4 + 2 * million * 2 / 8  # the replicated fp32 rest, the bf16 partition


def test_plan_command_reports_and_fails_when_the_run_cannot_fit(tmp_path):
    example = os.path.join(REPO, "clusters", "example_slurm.yaml")
    recipe = os.path.join(CONFIGS, "dinov2_vit_xray.yaml")
    fits = run_pretrain(["plan", "--config", recipe, "--cluster", example, "--json", str(tmp_path / "plan.json")])
    assert "largest micro-batch that fits" in fits.stdout and "does not fit" not in fits.stdout
    plan = json.load(open(tmp_path / "plan.json"))
    assert plan["fits"] and plan["largest_micro_batch"] > plan["micro_batch"] and plan["world"] == 16
    assert plan["activations_checkpointing_every_block"] < plan["activations_without_checkpointing"]
    huge = ["model.size=g", "data.batch_size=512", "distributed.zero_stage=0"]
    too_big = run_pretrain(["plan", "--config", recipe, "--cluster", example, *huge], check=False)
    assert too_big.returncode == 1 and "WARNING: does not fit" in too_big.stdout
    warned = run_pretrain(["submit", "--cluster", example, "--config", recipe, "--dry-run",
                           f"output_dir={tmp_path}", *huge])
    assert "WARNING: dinov2_vit_xray: the plan needs" in warned.stderr
    assert plan["total"] < 80 * GiB
