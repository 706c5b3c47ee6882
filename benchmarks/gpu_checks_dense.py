"""The dense-feature checks of `make gpu-check` (issue 22): DINOv2 with Gram anchoring in bf16 under ZeRO-3 on one
GPU (the Gram teacher taken at step 2 and retaken at 6, its crops at twice the student's side), and the
host-device synchronisations of one Gram-anchored step (the Gram teacher's pass and the bicubic resize among
them)."""
from __future__ import annotations

from benchmarks.gpu_runs import metrics, step_syncs, train

GRAM = ["objective.dinov2.gram.weight=1.0", "objective.dinov2.gram.start_step=2",
        "objective.dinov2.gram.refresh_every=4", "objective.dinov2.gram.max_refreshes=1"]


def gram_step_syncs() -> dict:
    """One Gram-anchored step's host syncs (tiny sizes, the Gram loss on from step 0)."""
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import build_objective
    from tests.conftest import TINY

    cfg = load_config(None, TINY + ["objective.name=dinov2", "objective.dinov2.local_crops_size=16",
                                    "objective.dinov2.gram.weight=1.0"])
    objective = build_objective(cfg)
    side = objective.data_spec().gram_size
    batch = {"global_crops": torch.randn(4, 2, 1, 32, 32), "local_crops": torch.randn(4, 2, 1, 16, 16),
             "gram_crops": torch.randn(4, 2, 1, side, side), "seed": torch.arange(4)}
    return step_syncs(objective, batch)


def check_gram(work: str) -> dict:
    out = train(work, "dinov2_gram_z3", "dinov2_tiny_cpu", f"data.shards={work}/data/xray", "distributed.zero_stage=3",
                "distributed.zero3_persistence_threshold=0", *GRAM)
    rows = [row for row in metrics(f"{work}/runs/dinov2_gram_z3") if "gram_loss" in row]
    gram = [row["gram_loss"] for row in rows]
    out["gram_loss"] = [round(v, 5) for v in gram]
    out["gram_off_before_start"] = all(v == 0 for v in gram[:2])
    out["gram_on_after"] = all(v > 0 for v in gram[2:])
    out["syncs"] = gram_step_syncs()
    out["ok"] = out["ok"] and out["gram_off_before_start"] and out["gram_on_after"]
    return out
