"""The dense-feature checks of `make gpu-check` (issue 22): DINOv2 with Gram anchoring in bf16 under ZeRO-3 on one
GPU (the Gram teacher taken at step 2 and retaken at 6, its crops at twice the student's side; the dense probe on
segmentation shards during it), and the
host-device synchronisations of one Gram-anchored step (the Gram teacher's pass and the bicubic resize among
them); Hi-End-MAE's hierarchical decoder on CT volumes under ZeRO-3, its cross-attention (queries and keys of
different lengths) in xformers against sdpa, and the syncs of one hierarchical step."""
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
                "distributed.zero3_persistence_threshold=0", *GRAM, f"probe.shards={work}/data/seg", "probe.every=5")
    rows = [row for row in metrics(f"{work}/runs/dinov2_gram_z3") if "gram_loss" in row]
    gram = [row["gram_loss"] for row in rows]
    out["gram_loss"] = [round(v, 5) for v in gram]
    out["gram_off_before_start"] = all(v == 0 for v in gram[:2])
    out["gram_on_after"] = all(v > 0 for v in gram[2:])
    out["syncs"] = gram_step_syncs()
    out["ok"] = out["ok"] and out["gram_off_before_start"] and out["gram_on_after"] and "probe_dense_miou" in out
    return out


STAGE = "train.stages=[{start: 5, set: {model.img_size: 64, data.batch_size: 4, optim.lr: 2.0e-4}}]"


def check_stages(work: str) -> dict:
    """A staged DINOv2 + Gram run: global crops 32 -> 64 px, batch 8 -> 4, a lower lr from step 6 on, ZeRO-3 bf16
    (the loader rebuilt and the Gram targets resized onto the larger grid on the device)."""
    out = train(work, "dinov2_staged_z3", "dinov2_tiny_cpu", f"data.shards={work}/data/xray", "distributed.zero_stage=3",
                "distributed.zero3_persistence_threshold=0", *GRAM, STAGE)
    rows = [row for row in metrics(f"{work}/runs/dinov2_staged_z3") if "loss" in row]
    out["stage"] = [int(row.get("stage", -1)) for row in rows]
    out["samples_per_s"] = [round(row.get("samples_per_s", 0), 1) for row in rows]
    out["mfu"] = [round(row.get("mfu", 0), 5) for row in rows]  # FLOPs per step follow the stage's crops and batch
    out["ok"] = out["finite"] and out["checkpoint_complete"] and out["stage"] == [0] * 5 + [1] * 5
    return out


HIEND = ["objective.videomae.decoder=hierarchical", "model.depth=4"]


def cross_attention_kernels() -> dict:
    """xformers against sdpa in bf16 for cross-attention shapes (217 decoder queries over 55 encoder keys)."""
    import torch

    from pretrain.models.attention import run_kernel

    torch.manual_seed(0)
    shapes = [(4, 12, 217, 32), (4, 12, 55, 32), (4, 12, 55, 32)]
    qkv = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for shape in shapes]
    results = {}
    for kernel in ("xformers", "sdpa"):
        for t in qkv:
            t.grad = None
        out = run_kernel(kernel, *qkv)
        out.float().square().sum().backward()
        results[kernel] = (out.detach().float(), [t.grad.float() for t in qkv])
    (ox, gx), (os_, gs) = results["xformers"], results["sdpa"]
    return {"max_abs_out": float((ox - os_).abs().max()),
            "max_rel_grad": max(float((a - b).norm() / b.norm()) for a, b in zip(gx, gs))}


def hiend_step_syncs() -> dict:
    """One hierarchical-decoder VideoMAE step's host syncs on a tiny CT volume."""
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import build_objective
    from tests.test_hiend import HIER_CT

    objective = build_objective(load_config(None, HIER_CT))
    return step_syncs(objective, {"volume": torch.randn(4, 1, 16, 32, 32), "seed": torch.arange(4)})


def check_hiend(work: str) -> dict:
    out = train(work, "hiend_ct_z3", "videomae_v2_tiny_ct_cpu", f"data.shards={work}/data/ct",
                "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0", *HIEND,
                f"probe.shards={work}/data/ctseg", "probe.every=5")  # the dense probe in 3D, on the device
    out["cross_attention"] = cross_attention_kernels()
    out["syncs"] = hiend_step_syncs()
    out["ok"] = out["ok"] and out["cross_attention"]["max_abs_out"] < 2e-2 and "probe_dense_miou" in out
    return out
