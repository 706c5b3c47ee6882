"""What the checks of `make gpu-check` share: the real CLI in its own process, a short training run judged on
its losses and checkpoint, and the host-device synchronisations of one objective step."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "pretrain", "configs")
GPU = ["distributed.precision=bf16", "tracking.backend=jsonl", "data.num_workers=2", "train.log_every=1",
       "train.peak_tflops=989"]  # H100/H200 dense bf16: the runs log MFU as on a cluster profile


def pretrain(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real CLI in its own process (one rank: NCCL on the one GPU)."""
    proc = subprocess.run([sys.executable, "-m", "pretrain.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"pretrain {' '.join(args[:3])} exited {proc.returncode}: {proc.stderr[-2500:]}")
    return proc


def metrics(run: str) -> list:
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def train(work: str, name: str, recipe: str, *overrides: str, steps: int = 10) -> dict:
    """A run of ``recipe`` for ``steps``: losses finite and falling, a complete final checkpoint."""
    run = os.path.join(work, "runs", name)
    shutil.rmtree(run, ignore_errors=True)  # a rerun of the check starts afresh, not from its last checkpoint
    start = time.time()
    pretrain("train", "--config", os.path.join(CONFIGS, f"{recipe}.yaml"), f"output_dir={work}/runs", f"name={name}",
             f"train.steps={steps}", "checkpoint.every=5", *GPU, *overrides)
    rows = [row for row in metrics(run) if "loss" in row]
    losses = [row["loss"] for row in rows]
    final = os.path.join(run, "checkpoints", f"step_{steps:06d}")
    out = {"losses": [round(v, 5) for v in losses], "seconds": round(time.time() - start, 1),
           "finite": all(map(math.isfinite, losses)), "falling": sum(losses[-3:]) < sum(losses[:3]),
           "checkpoint_complete": os.path.isfile(os.path.join(final, "COMPLETE")),
           "max_memory_reserved_gib": max((r.get("gpu_memory_reserved_gib", 0) for r in rows), default=None),
           "samples_per_s_last": rows[-1].get("samples_per_s"), "mfu_last": rows[-1].get("mfu")}
    out.update({k: v for k, v in rows[-1].items() if k.startswith("probe_")})
    saves = [row for row in metrics(run) if "checkpoint_save_s" in row]  # how long saving held the run (issue 19.7)
    out["checkpoint_save_s"] = [round(row["checkpoint_save_s"], 3) for row in saves]
    out["checkpoint_save_share"] = [round(row["checkpoint_save_share"], 4) for row in saves]
    out["checkpoint_background"] = [row.get("checkpoint_background") for row in saves]  # auto's choice per save
    out["checkpoint_write_s"] = [round(row["checkpoint_write_s"], 3) for row in metrics(run)
                                 if "checkpoint_write_s" in row]
    out["ok"] = out["finite"] and out["falling"] and out["checkpoint_complete"] and len(losses) == steps
    return out


def step_syncs(objective, batch: dict) -> dict:
    """{'syncs', 'first'}: the host-device synchronisations of one bf16 training step of ``objective`` on the GPU
    (after a warm-up step: lazy initialisation syncs once), ``batch`` given its masks as the DataLoader workers
    draw them and moved as the trainer moves it."""
    import torch

    from pretrain.backbone import bind_kernels
    from pretrain.trainer import views_to

    model = objective.trainable().cuda().to(torch.bfloat16)
    objective.to(torch.device("cuda"))
    for network in objective.models():
        bind_kernels(network, torch.device("cuda"), torch.bfloat16)
    spec = objective.data_spec()
    if spec.masks is not None:
        batch.update(spec.masks.batch(batch["seed"]))
    batch = views_to(batch, torch.device("cuda"))
    objective(model, batch, 0).loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        objective(model, batch, 1).loss.backward()
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"syncs": len(syncs), "first": syncs[:8]}
