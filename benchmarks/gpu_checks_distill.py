"""The distillation check of `make gpu-check`: the tiny distill recipes in bf16 on one GPU from the teachers the
training checks leave under WORK (``mae_z2`` for g2sd, two students and post-hoc registers, ``dinov2_z0`` for
dino), g2sd again with the teacher partitioned (its own ZeRO-3 engine), each student exported with timm /
transformers parity, and the host-device synchronisations of one step of each (the teacher's passes among them;
two students: one teacher pass a step, counted)."""
from __future__ import annotations

import os

from benchmarks.gpu_runs import CONFIGS, metrics, pretrain, step_syncs, train

RUNS = {"g2sd": ("distill_g2sd_tiny_cpu", "mae_z2", 10, ["distributed.zero_stage=3",
                                                         "distributed.zero3_persistence_threshold=0"]),
        "dino": ("distill_dino_tiny_cpu", "dinov2_z0", 20, ["distributed.zero_stage=2"]),
        "registers": ("distill_registers_tiny_cpu", "mae_z2", 20, ["distributed.zero_stage=3",
                                                                   "distributed.zero3_persistence_threshold=0"]),
        "g2sd_partitioned": ("distill_g2sd_tiny_cpu", "mae_z2", 10, ["distributed.zero_stage=2",
                                                                     "objective.distill.teacher_placement=partitioned"]),
        "students": ("distill_students_tiny_cpu", "mae_z2", 10, ["distributed.zero_stage=3",
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
    """One step's host syncs of the recipe's student (of its first student where it has several)."""
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    objective = build_objective(load_config(os.path.join(CONFIGS, f"{recipe}.yaml"),
                                            [f"objective.distill.teacher={teacher}"]))
    if hasattr(objective, "local_students"):
        objective = objective.local_students()[0][1]
    return step_syncs(objective, one_step_batch(objective))


def teacher_passes(work: str, kind: str) -> list:
    """Two students on one GPU: the teacher's passes of each logged step (one a step)."""
    if kind != "students":
        return []
    return [row["teacher_passes_per_step"] for row in metrics(os.path.join(work, "runs", f"distill_{kind}"))
            if "teacher_passes_per_step" in row]


def check_distill(work: str) -> dict:
    """g2sd (ZeRO-3, 10 bf16 steps), dino (ZeRO-2, 20), post-hoc registers (ZeRO-3, 20), g2sd with a partitioned
    teacher (ZeRO-2, 10) and two students (ZeRO-3, 10): falling finite loss, complete checkpoint, export
    --verify; one step's host syncs."""
    out = {}
    for kind, (recipe, teacher_run, steps, overrides) in RUNS.items():
        teacher = os.path.join(work, "runs", teacher_run)
        try:
            run = train(work, f"distill_{kind}", recipe, f"data.shards={work}/data/xray",
                        f"objective.distill.teacher={teacher}", *overrides, steps=steps)
            text = pretrain("export", os.path.join(work, "runs", f"distill_{kind}"), "--verify", timeout=180).stdout
            passes = teacher_passes(work, kind)
            out[kind] = {"run": run, "export": text.strip().splitlines()[-2:], "syncs": distill_syncs(recipe, teacher),
                         "teacher_passes_per_step": passes, "ok": run["ok"] and "parity" in text
                         and all(count == 1 for count in passes)}
        except Exception as error:  # noqa: BLE001 - each kind is reported on its own
            out[kind] = {"ok": False, "error": str(error)[-1500:]}
    out["ok"] = all(result["ok"] for result in out.values())
    return out
