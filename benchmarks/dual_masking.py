"""VideoMAE V2 dual masking vs decoding every hidden tubelet: step time and peak memory; writes JSON.

Same model, batch and encoder mask (tube, 0.9); the only change is ``decoder_mask_ratio``
(0.0: plain VideoMAE, the decoder reconstructs every hidden tubelet; 0.5: running-cell dual
masking). Each setting runs in a fresh process (so its peak resident memory is its own):
a forward + backward + AdamW step on random clips, the median of ``--steps`` timed steps
after 2 warm-up steps, plus the bytes autograd keeps for backward at the end of the forward.

    .venv/bin/python benchmarks/dual_masking.py                       # ViT-S, 16 x 112 x 112, batch 4
    .venv/bin/python benchmarks/dual_masking.py --size B --img-size 160 --batch 2
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import RESULTS, write_report  # noqa: E402


def measure(args: tuple) -> dict:
    """One setting in this (fresh) process: step times, saved activation bytes, peak resident memory."""
    size, img_size, frames, batch, decoder_ratio, steps, threads = args
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, [
        "objective.name=videomae", "data.modality=video", f"model.size={size}", f"model.img_size={img_size}",
        "model.patch_size=16", "model.in_chans=3", f"model.frames={frames}", "model.tubelet_size=2",
        "objective.videomae.mask_ratio=0.9", "objective.videomae.encoder_masking=tube",
        f"objective.videomae.decoder_mask_ratio={decoder_ratio}", "objective.videomae.decoder_dim=384",
        "objective.videomae.decoder_depth=4", "objective.videomae.decoder_heads=6",
        "data.transforms.mean=[0.5,0.5,0.5]", "data.transforms.std=[0.2,0.2,0.2]"])
    objective = build_objective(cfg)
    model = objective.trainable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch_data = {"clip": torch.randn(batch, 3, frames, img_size, img_size), "seed": torch.arange(batch)}
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes() if tensor.device.type == "cpu" else 0)
        return tensor

    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = objective(model, batch_data, step)
        else:
            out = objective(model, batch_data, step)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return {"decoder_mask_ratio": decoder_ratio, "step_s_median": round(statistics.median(times), 4),
            "step_s_all": [round(t, 4) for t in times], "visible_tokens": out.metrics["visible_tokens"],
            "decoded_tokens": out.metrics["decoded_tokens"],
            "saved_activation_mib": round(sum(saved) / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="S")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(RESULTS, "dual_masking.json"))
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    rows = []
    for ratio in (0.0, 0.5):
        with context.Pool(1) as pool:
            rows.append(pool.apply(measure, ((args.size, args.img_size, args.frames, args.batch, ratio, args.steps,
                                              args.threads),)))
        print(rows[-1], flush=True)
    plain, dual = rows
    write_report({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cpu", "dtype": "fp32"},
        "model": {"size": args.size, "img_size": args.img_size, "frames": args.frames, "tubelet": 2, "patch": 16,
                  "decoder": "4 blocks x 384", "batch": args.batch, "encoder_mask": "tube 0.9"},
        "settings": rows,
        "speedup": round(plain["step_s_median"] / dual["step_s_median"], 3),
        "faster_by": round(1 - dual["step_s_median"] / plain["step_s_median"], 3),
        "target": "dual masking at least 20% faster per step than decoding every hidden tubelet",
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
