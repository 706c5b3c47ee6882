"""Training-step benchmark with model FLOPs utilisation (MFU), per attention backend; writes JSON.

For a recipe (and overrides, e.g. a model size), on the current device (CUDA when present,
else CPU) and in the recipe's precision:

- the device's measured peak: a large square matrix product in the same dtype, timed in the
  same run (FLOP/s);
- for each attention backend that can run here (sdpa; xformers on CUDA when installed): a
  full training step of the objective (forward, backward, AdamW) on a synthetic batch, in
  one process without DeepSpeed: median step time, samples/s, peak memory (CUDA: the
  allocator's peak; CPU: the process's peak resident size), and MFU = planner FLOPs per
  step / step time / measured peak;
- our ViT's forward + backward against timm's ``VisionTransformer`` of identical size on
  the same inputs (our time / timm's time).

    .venv/bin/python benchmarks/step.py --recipe mae_tiny_cpu
    .venv/bin/python benchmarks/step.py --recipe mae_vit_xray model.size=S model.img_size=224 --batch 16
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_flops(device, dtype, size: int, rounds: int = 3) -> float:
    """FLOP/s of a size x size matrix product on this device in this dtype (2 n^3 per product): the best
    of ``rounds`` medians, since the peak is what the device can do."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return max(2 * size**3 / timed(lambda: a @ b, device, repeats=5) for _ in range(rounds))


def peak_memory(device) -> float:
    """Peak bytes: the CUDA allocator's, or this process's peak resident set on CPU."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def synthetic_batch(spec, size: int, device, dtype) -> dict:
    import torch

    if spec.kind == "single":
        views = {"image": torch.randn(size, spec.in_chans, spec.img_size, spec.img_size)}
    else:
        views = {"global_crops": torch.randn(size, 2, spec.in_chans, spec.img_size, spec.img_size),
                 "local_crops": torch.randn(size, spec.local_crops, spec.in_chans, spec.local_size, spec.local_size)}
    batch = {name: value.to(device, dtype) for name, value in views.items()}
    batch["seed"] = torch.arange(size, dtype=torch.int64)
    return batch


def train_step_benchmark(cfg, backend: str, batch_size: int, device, dtype, repeats: int) -> dict:
    """One backend: step time, samples/s, peak memory and planner FLOPs of the objective's training step."""
    import torch

    from pretrain.objectives import build_objective
    from pretrain.plan import step_flops, token_passes

    cfg.model.attn_backend = backend
    objective = build_objective(cfg)
    module = objective.trainable().to(device, dtype).train()
    objective.to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batch = synthetic_batch(objective.data_spec(), batch_size, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective(module, batch, 0).loss.backward()
        optimizer.step()

    seconds = timed(step, device, repeats)
    flops = step_flops(token_passes(objective), batch_size)
    return {"step_s": round(seconds, 5), "samples_per_s": round(batch_size / seconds, 2),
            "peak_memory_mib": round(peak_memory(device) / 2**20, 1), "model_flops_per_step": flops,
            "achieved_tflops": round(flops / seconds / 1e12, 4)}


def timm_ratio(cfg, batch_size: int, device, dtype, repeats: int) -> dict:
    """Our encoder's forward + backward time over timm's VisionTransformer of the same size."""
    import timm
    import torch

    from pretrain.export import timm_config
    from pretrain.backbone import build_vit

    ours = build_vit(cfg.model, attn_backend="sdpa").to(device, dtype).train()
    config = timm_config(cfg.model, ours)
    theirs = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).to(device, dtype)
    theirs.train()
    images = torch.randn(batch_size, ours.in_chans, ours.img_size, ours.img_size, device=device, dtype=dtype)

    def run(model, forward):
        return lambda: forward(model, images).float().mean().backward()

    ours_s = timed(run(ours, lambda m, x: m(x)), device, repeats)
    timm_s = timed(run(theirs, lambda m, x: m.forward_features(x)), device, repeats)
    return {"ours_s": round(ours_s, 5), "timm_s": round(timm_s, 5), "ours_over_timm": round(ours_s / timm_s, 3)}


def main() -> None:
    """Measure and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mae_tiny_cpu", help="a recipe in pretrain/configs (no .yaml)")
    parser.add_argument("--batch", type=int, help="micro-batch (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--matmul", type=int, default=2048, help="side of the peak-measuring matrix product")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/step_<recipe>_<size>_<device>.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    import torch

    from pretrain.config import load_config
    from pretrain.models.attention import xformers_available

    cfg = load_config(os.path.join(REPO, "pretrain", "configs", f"{args.recipe}.yaml"), args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if cfg.distributed.precision == "bf16" else torch.float32
    batch = args.batch or cfg.data.batch_size
    torch.manual_seed(0)
    peak = peak_flops(device, dtype, args.matmul)
    backends = ["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
    results = {}
    for backend in backends:
        result = train_step_benchmark(load_config(os.path.join(REPO, "pretrain", "configs", f"{args.recipe}.yaml"),
                                                  args.overrides), backend, batch, device, dtype, args.repeats)
        result["mfu"] = round(result["model_flops_per_step"] / result["step_s"] / peak, 4)
        results[backend] = result
    report = {
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "recipe": args.recipe, "overrides": args.overrides, "dtype": str(dtype).replace("torch.", ""),
        "model": f"ViT {cfg.model.size} ({cfg.model.embed_dim or 'preset'} wide), {cfg.model.img_size} px, "
                 f"patch {cfg.model.patch_size}, {cfg.objective.name}", "micro_batch": batch,
        "measured_peak_tflops": round(peak / 1e12, 4), "matmul_side": args.matmul,
        "train_step": results,
        "vit_forward_backward_vs_timm": timm_ratio(cfg, batch, device, dtype, args.repeats),
    }
    from benchmarks.report import RESULTS, write_report

    write_report(report, args.out or os.path.join(RESULTS, f"step_{args.recipe}_{cfg.model.size}_{device.type}.json"))


if __name__ == "__main__":
    main()
