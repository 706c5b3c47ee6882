"""The distillation check of `make gpu-check`: the tiny distill recipes in bf16 on one GPU from the teachers the
training checks leave under WORK (``mae_z2`` for g2sd and post-hoc registers, ``dinov2_z0`` for dino), each
student exported with timm / transformers parity, and the host-device synchronisations of one step of each
(the teacher's passes among them)."""
from __future__ import annotations

import os

from benchmarks.gpu_runs import CONFIGS, pretrain, step_syncs, train

RUNS = {"g2sd": ("distill_g2sd_tiny_cpu", "mae_z2", 10, ["distributed.zero_stage=3",
                                                         "distributed.zero3_persistence_threshold=0"]),
        "dino": ("distill_dino_tiny_cpu", "dinov2_z0", 20, ["distributed.zero_stage=2"]),
        "registers": ("distill_registers_tiny_cpu", "mae_z2", 20, ["distributed.zero_stage=3",
                                                                   "distributed.zero3_persistence_threshold=0"])}
"""kind -> (recipe, the training check's run that is its teacher, steps, overrides); dino's iBOT term varies with
the masks drawn and the registers' targets with the views drawn, so they are judged over more steps."""


def one_step_batch(objective):
    """A random batch of the objective's views at the recipe's sizes (seeds for its masks)."""
    import torch

    spec = objective.data_spec()
    if spec.kind == "single":
        return {"image": torch.randn(8, spec.in_chans, spec.img_size, spec.img_size), "seed": torch.arange(8)}
    return {"global_crops": torch.randn(4, 2, spec.in_chans, spec.img_size, spec.img_size), "seed": torch.arange(4),
            "local_crops": torch.randn(4, spec.local_crops, spec.in_chans, spec.local_size, spec.local_size)}


def distill_syncs(recipe: str, teacher: str) -> dict:
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    objective = build_objective(load_config(os.path.join(CONFIGS, f"{recipe}.yaml"),
                                            [f"objective.distill.teacher={teacher}"]))
    return step_syncs(objective, one_step_batch(objective))


def check_distill(work: str) -> dict:
    """g2sd (ZeRO-3, 10 bf16 steps), dino (ZeRO-2, 20) and post-hoc registers (ZeRO-3, 20): falling finite loss,
    complete checkpoint, export --verify; one step's host syncs."""
    out = {}
    for kind, (recipe, teacher_run, steps, overrides) in RUNS.items():
        teacher = os.path.join(work, "runs", teacher_run)
        try:
            run = train(work, f"distill_{kind}", recipe, f"data.shards={work}/data/xray",
                        f"objective.distill.teacher={teacher}", *overrides, steps=steps)
            text = pretrain("export", os.path.join(work, "runs", f"distill_{kind}"), "--verify", timeout=180).stdout
            out[kind] = {"run": run, "export": text.strip().splitlines()[-2:], "syncs": distill_syncs(recipe, teacher),
                         "ok": run["ok"] and "parity" in text}
        except Exception as error:  # noqa: BLE001 - each kind is reported on its own
            out[kind] = {"ok": False, "error": str(error)[-1500:]}
    out["ok"] = all(result["ok"] for result in out.values())
    return out
