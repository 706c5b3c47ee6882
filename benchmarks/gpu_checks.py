"""The checks of `make gpu-check` (benchmarks/gpu_check.py runs each in its own process).

    python -m benchmarks.gpu_checks NAME WORK RESULT.json

Each check returns a dict with ``ok``; an exception is a failed check with its message. Checks that
train use the tiny recipes in bf16 on one GPU over NCCL, tracked to ``metrics.jsonl``; they share
the shards the ``data`` check writes under WORK, and ``export`` reads the runs the training checks
leave there.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

from benchmarks.gpu_checks_dense import check_gram, check_hiend, check_stages
from benchmarks.gpu_checks_distill import check_distill
from benchmarks.gpu_runs import CONFIGS, GPU, REPO, metrics, pretrain, step_syncs, train


def check_data(work: str) -> dict:
    """Synthetic X-ray shards, labelled digit shards (probes) and CT volume shards."""
    sys.path.insert(0, REPO)
    from data_pipeline.writers import write_xray_shards
    from tests.conftest import make_xray_folder, write_digits

    data = os.path.join(work, "data")
    write_xray_shards(make_xray_folder(f"{data}/raw_xray", 96), f"{data}/xray", samples_per_shard=16, progress=False)
    labels = write_digits(f"{data}/raw_digits", 200)
    write_xray_shards(f"{data}/raw_digits", f"{data}/digits", samples_per_shard=50, progress=False, labels=labels)
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", "ct", f"{data}/raw_ct", "--count", "12"],
                   cwd=REPO, check=True, capture_output=True)
    pretrain("shards", "ct", f"{data}/raw_ct", f"{data}/ct", "--samples-per-shard", "4", "--no-progress")
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", "segmentation", f"{data}/raw_seg", "--count",
                    "64"], cwd=REPO, check=True, capture_output=True)
    pretrain("shards", "xray", f"{data}/raw_seg/images", f"{data}/seg", "--masks", f"{data}/raw_seg/masks",
             "--no-progress")
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", "ct-segmentation", f"{data}/raw_ctseg", "--count",
                    "24"], cwd=REPO, check=True, capture_output=True)
    pretrain("shards", "ct", f"{data}/raw_ctseg/volumes", f"{data}/ctseg", "--masks", f"{data}/raw_ctseg/masks",
             "--no-progress")
    kinds = ("xray", "digits", "ct", "seg", "ctseg")
    return {"ok": all(os.path.isfile(f"{data}/{kind}/manifest.json") for kind in kinds)}


def check_dist(work: str) -> dict:
    """Every pretrain.dist helper and both object collectives on a 1-process NCCL group."""
    import torch

    from pretrain import dist
    from pretrain.engine import init_distributed

    init_distributed(timeout_minutes=5)
    backend = torch.distributed.get_backend()
    gpu = torch.ones(3, device="cuda")
    results = {
        "backend": backend, "collective_device": str(dist.collective_device()),
        "host_group_gloo": torch.distributed.get_backend(dist.host_group()) == "gloo",
        "all_reduce_max": dist.all_reduce_max(2.5) == 2.5, "all_reduce_sum": dist.all_reduce_sum([1, 2]) == [1.0, 2.0],
        "all_reduce_tensor_cuda": bool(dist.all_reduce_tensor(gpu).eq(1).all()),
        "all_reduce_tensor_cpu": dist.all_reduce_tensor(torch.ones(2)).device.type == "cpu",
        "broadcast_object": dist.broadcast_object({"a": 1}) == {"a": 1},
        "all_gather_object": dist.all_gather_object("x") == ["x"],
    }
    dist.barrier()
    dist.destroy()
    results["destroyed"] = not dist.is_initialized()
    results["ok"] = backend == "nccl" and all(v for k, v in results.items() if k not in ("backend", "collective_device"))
    return results


def check_attention(work: str) -> dict:
    """xformers against sdpa, forward and backward in bf16, for the presets' head dims and packed crops."""
    import torch

    from pretrain.models import VIT_PRESETS
    from pretrain.models.attention import BlockDiagonal, choose_kernel, run_kernel

    device, out = torch.device("cuda"), {"head_dims": {}}
    dims = sorted({dim // heads for dim, _, heads, _ in VIT_PRESETS.values()})  # 16 (tiny), 64, 80, 88
    for head_dim in dims:
        kernel = choose_kernel("auto", device, torch.bfloat16, head_dim)
        out["head_dims"][head_dim] = {"kernel": kernel, **compare(head_dim, None, run_kernel)}
    packed = BlockDiagonal([197, 197, 37, 37, 37])
    out["packed"] = compare(64, packed, run_kernel)
    worst = max([r["max_abs_out"] for r in out["head_dims"].values()] + [out["packed"]["max_abs_out"]])
    out["ok"] = worst < 2e-2 and all(r["kernel"] == "xformers" for r in out["head_dims"].values())
    return out


def compare(head_dim: int, packed, run_kernel) -> dict:
    import torch

    torch.manual_seed(0)
    tokens = sum(packed.seqlens) if packed else 257
    batch = 1 if packed else 4
    qkv = [torch.randn(batch, 8, tokens, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3)]
    results = {}
    for kernel in ("xformers", "sdpa"):
        for t in qkv:
            t.grad = None
        o = run_kernel(kernel, *qkv, packed)
        o.float().square().sum().backward()
        results[kernel] = (o.detach().float(), [t.grad.float() for t in qkv])
    (ox, gx), (os_, gs) = results["xformers"], results["sdpa"]
    return {"max_abs_out": float((ox - os_).abs().max()),
            "max_rel_grad": max(float((a - b).norm() / b.norm()) for a, b in zip(gx, gs))}


def check_train_mae(work: str) -> dict:
    return train(work, "mae_z2", "mae_tiny_cpu", f"data.shards={work}/data/xray", "distributed.zero_stage=2")


def check_train_dinov2(work: str) -> dict:
    return train(work, "dinov2_z0", "dinov2_tiny_cpu", f"data.shards={work}/data/xray", "distributed.zero_stage=0",
                 "model.drop_path=0.1", f"probe.shards={work}/data/digits", "probe.every=5", "probe.linear_steps=50")


def check_train_videomae(work: str) -> dict:
    return train(work, "videomae_z3", "videomae_v2_tiny_ct_cpu", f"data.shards={work}/data/ct",
                 "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0",
                 "model.activation_checkpointing=1")


def import_and_compare(source: str, folder: str, reference) -> tuple:
    """`pretrain import SOURCE FOLDER`, then (max feature difference of our encoder rebuilt from the folder and
    ``reference`` on the GPU in fp32, the import's model overrides)."""
    import torch

    from pretrain import bundles
    from pretrain.importers import build_encoder

    shutil.rmtree(folder, ignore_errors=True)
    pretrain("import", source, folder)
    fields, _ = bundles.read_bundle(folder)
    ours = build_encoder(fields)
    bundles.load_encoders([ours], folder)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    images = torch.randn(4, 1, 32, 32, device="cuda")
    with torch.no_grad():
        difference = float((ours.cuda().eval()(images) - reference(images)).abs().max())
    with open(os.path.join(folder, "import.json")) as handle:
        return difference, json.load(handle)["overrides"]


def check_import(work: str) -> dict:
    """`pretrain import` of a timm ViT (random init, saved locally), its features on the GPU against timm's in
    fp32, then a 5-step bf16 MAE run from it through checkpoint.init_from."""
    import timm
    from timm.models import save_for_hf

    source, folder = os.path.join(work, "import_src"), os.path.join(work, "import_vit")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=64, depth=2, num_heads=4,
                              img_size=32, patch_size=8, in_chans=1).eval()
    save_for_hf(model, source, safe_serialization=True)
    difference, overrides = import_and_compare(source, folder, model.cuda().forward_features)
    run = train(work, "mae_from_import", "mae_tiny_cpu", f"data.shards={work}/data/xray", "distributed.zero_stage=2",
                f"checkpoint.init_from={folder}", *overrides, steps=5)
    return {"max_feature_difference_gpu_fp32": difference, "run": run, "ok": difference <= 1e-4 and run["ok"]}


def check_rope(work: str) -> dict:
    """A transformers DINOv3ViTModel (random init) imported: rotary features on the GPU against its own in fp32,
    then 5 bf16 DINOv2 steps from it under ZeRO-3 with packed crops (xformers' block-diagonal rows, a table per
    sequence; the masked key bias gathered in its own layer)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    source, folder = os.path.join(work, "dinov3_src"), os.path.join(work, "import_dinov3")
    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                             image_size=32, patch_size=8, num_channels=1, num_register_tokens=2)
    model = DINOv3ViTModel(config).eval()
    model.save_pretrained(source)
    model = model.cuda()
    difference, overrides = import_and_compare(source, folder, lambda x: model(pixel_values=x).last_hidden_state)
    run = train(work, "dinov2_rope", "dinov2_tiny_cpu", f"data.shards={work}/data/xray", "distributed.zero_stage=3",
                "distributed.zero3_persistence_threshold=0",  # every weight partitioned: the masked qkv gathered
                f"checkpoint.init_from={folder}", "objective.dinov2.pack_crops=auto", *overrides, steps=5)
    ran = run["finite"] and run["checkpoint_complete"] and len(run["losses"]) == 5  # DINOv2 rises before it falls
    return {"max_feature_difference_gpu_fp32": difference, "run": run, "ok": difference <= 1e-4 and ran}


def check_stop_resume(work: str) -> dict:
    """The stop signal mid-run checkpoints and exits 0; the next start resumes at that step and finishes."""
    run = os.path.join(work, "runs", "stopped")
    shutil.rmtree(run, ignore_errors=True)
    args = [sys.executable, "-m", "pretrain.main", "train", "--config", os.path.join(CONFIGS, "mae_tiny_cpu.yaml"),
            f"output_dir={work}/runs", "name=stopped", f"data.shards={work}/data/xray", "train.steps=30",
            "checkpoint.every=0", "checkpoint.writer=background", *GPU]  # the signal's checkpoint from a host copy
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(os.path.join(run, "metrics.jsonl")) and len(metrics(run)) >= 5:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.2)
    code = proc.wait(timeout=120)
    stopped_at = len(metrics(run))
    marker = os.path.isfile(os.path.join(run, "STOPPED"))
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, timeout=200)
    steps = [row["step"] for row in metrics(run)]
    return {"exit_code": code, "stopped_at": stopped_at, "marker": marker, "steps": steps,
            "ok": code == 0 and marker and steps == list(range(1, 31)) and 5 <= stopped_at < 30}


def check_checkpoint_copy(work: str) -> dict:
    """The background checkpoint writer's host copy from the GPU: ViT-B-sized bf16 weights plus fp32 masters and
    Adam moments (~1.2 GB) into pinned buffers, the first copy (allocating them) and a second (reusing them):
    the rate, the buffers pinned and reused, the values exact."""
    import torch

    from pretrain.checkpoint_writer import HostCopier

    generator = torch.Generator(device="cuda").manual_seed(0)
    blocks = [torch.randn(7_000_000, device="cuda", generator=generator) for _ in range(12)]  # 12 x (fp32 + 2 moments)
    state = {"module": {f"b{i}": t.to(torch.bfloat16) for i, t in enumerate(blocks)},
             "optimizer": [{"master": t, "exp_avg": t * 0.1, "exp_avg_sq": t * t} for t in blocks]}
    copier, out = HostCopier(), {}
    for attempt in ("first", "second"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        copied = copier.copy("model.pt", state)
        seconds = time.perf_counter() - start
        out[f"{attempt}_s"] = round(seconds, 4)
        out[f"{attempt}_gb_per_s"] = round(copier.nbytes / seconds / 1e9, 2)
    out["gb"] = round(copier.nbytes / 1e9, 3)
    out["pinned"] = all(buffer.is_pinned() for buffer in copier.buffers.values())
    out["exact"] = all(torch.equal(copied["module"][f"b{i}"], state["module"][f"b{i}"].cpu()) and
                       torch.equal(copied["optimizer"][i]["exp_avg_sq"], state["optimizer"][i]["exp_avg_sq"].cpu())
                       for i in range(len(blocks)))
    out["ok"] = out["pinned"] and out["exact"] and out["second_gb_per_s"] > 1.0
    return out


def check_export(work: str) -> dict:
    """export --verify (timm and transformers parity) from the ZeRO-0, ZeRO-2 and ZeRO-3 runs' checkpoints."""
    out = {}
    for name in ("dinov2_z0", "mae_z2", "videomae_z3"):
        try:
            text = pretrain("export", os.path.join(work, "runs", name), "--verify", timeout=180).stdout
            out[name] = {"ok": True, "tail": text.strip().splitlines()[-3:]}
        except Exception as error:  # noqa: BLE001 - each export is reported on its own
            out[name] = {"ok": False, "error": str(error)[-1500:]}
    out["ok"] = all(r["ok"] for r in out.values())
    return out


def check_deterministic(work: str) -> dict:
    """train.deterministic on a GPU (CUBLAS_WORKSPACE_CONFIG set before CUDA starts; every kernel DINOv2
    uses must have a deterministic CUDA version): 3 steps, and the same losses twice."""
    runs = [train(work, f"deterministic_{index}", "dinov2_tiny_cpu", f"data.shards={work}/data/xray",
                  "train.deterministic=true", "checkpoint.every=0", steps=3) for index in range(2)]
    return {"losses": [run["losses"] for run in runs], "ok": runs[0]["finite"] and runs[0]["losses"] == runs[1]["losses"]}


def check_compile(work: str) -> dict:
    """torch.compile of the ViT-B blocks in bf16: graph breaks, graphs, recompiles over 3 steps."""
    import torch
    import torch._dynamo

    from pretrain.config import load_config
    from pretrain.backbone import bind_kernels, build_vit, compile_blocks

    cfg = load_config(None, ["model.size=B", "model.img_size=224", "model.patch_size=16"])
    model = build_vit(cfg.model).cuda().to(torch.bfloat16)
    bind_kernels(model, torch.device("cuda"), torch.bfloat16)
    x = torch.randn(8, 1, 224, 224, device="cuda")
    explained = torch._dynamo.explain(model.blocks[0])(model.embed_patches(x).detach())
    torch._dynamo.reset()
    compile_blocks(model)
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        model(x).float().mean().backward()
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    recompiles = sum(counters.get("recompiles", {}).values())
    return {"graph_breaks_per_block": explained.graph_break_count, "graphs_per_block": explained.graph_count,
            "break_reasons": [str(r.reason) for r in explained.break_reasons][:5], "recompiles": recompiles,
            "ok": explained.graph_break_count == 0 and recompiles == 0}


def check_sync(work: str) -> dict:
    """Host-device synchronisations in one training step of each objective under set_sync_debug_mode."""
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import build_objective
    from tests.conftest import TINY

    out = {}
    for name, overrides, batch in (
            ("mae", [], {"image": torch.randn(8, 1, 32, 32), "seed": torch.arange(8)}),
            ("dinov2", ["objective.name=dinov2", "objective.dinov2.local_crops_size=16"], None)):
        objective = build_objective(load_config(None, TINY + overrides))
        spec = objective.data_spec()
        if batch is None:
            batch = {"global_crops": torch.randn(4, 2, 1, 32, 32), "seed": torch.arange(4),
                     "local_crops": torch.randn(4, spec.local_crops, 1, 16, 16)}
        out[name] = step_syncs(objective, batch)
    out["ok"] = True  # a measurement: the budget is the CPU test's; this shows what the GPU counts
    return out


def check_planner(work: str) -> dict:
    """The planner's per-GPU estimate against measured max_memory_reserved, ViT-L DINOv2 on one GPU."""
    profile = os.path.join(work, "one_gpu.yaml")
    with open(profile, "w") as handle:
        handle.write("name: one-gpu\nscheduler: local\nnodes: 1\nprocesses_per_node: 1\ngpus_per_node: 1\n"
                     "gpu_memory_gb: 140\n")
    overrides = ["model.size=L", "data.batch_size=16", f"data.shards={work}/data/xray", "distributed.zero_stage=0"]
    plan_json = os.path.join(work, "plan_vitl.json")
    subprocess.run([sys.executable, "-m", "pretrain.main", "plan", "--config",
                    os.path.join(CONFIGS, "dinov2_vit_xray.yaml"), "--cluster", profile, "--json", plan_json,
                    "distributed.precision=bf16", *overrides], cwd=REPO, capture_output=True, timeout=120)
    with open(plan_json) as handle:
        plan = json.load(handle)
    measured = train(work, "dinov2_vitl", "dinov2_vit_xray", *overrides, steps=3)
    reserved = measured["max_memory_reserved_gib"]
    return {"estimate_gib": round(plan["total"] / 2**30, 2), "measured_reserved_gib": reserved,
            "ratio": round(plan["total"] / 2**30 / reserved, 3) if reserved else None,
            "finite": measured["finite"], "ok": bool(reserved) and measured["finite"]}


def check_step_benchmark(work: str) -> dict:
    """benchmarks/step.py samples/s and MFU for ViT-B and ViT-L, MAE and DINOv2, in bf16."""
    out = {}
    for recipe in ("mae_vit_xray", "dinov2_vit_xray"):
        for size in ("B", "L"):
            path = os.path.join(work, f"step_{recipe}_{size}.json")
            subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "step.py"), "--recipe", recipe,
                            "--batch", "32", "--repeats", "3", "--matmul", "8192", "--out", path,
                            f"model.size={size}", "distributed.precision=bf16"],
                           cwd=REPO, check=True, capture_output=True, timeout=150)
            with open(path) as handle:
                out[f"{recipe}_{size}"] = json.load(handle)
    out["ok"] = True
    return out


def check_apex(work: str) -> dict:
    """apex's FusedLayerNorm against PyTorch's where apex runs; why not otherwise."""
    import torch

    from pretrain import kernels
    from pretrain.models.norm import layer_norm

    runs, why = kernels.apex_runs()
    if not runs:
        return {"ok": True, "skipped": why}
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    fused, plain = layer_norm(1024, 1e-6, "apex").cuda().bfloat16(), torch.nn.LayerNorm(1024, 1e-6).cuda()
    diff = float((fused(x).float() - plain.bfloat16()(x).float()).abs().max())
    return {"ok": diff < 5e-2, "max_abs": diff}


def check_decode(work: str) -> dict:
    """Pathology JPEG tiles through the CPU path and the device path (nvjpeg): samples/s, views within tolerance."""
    from benchmarks.decode_device import check

    return check(work)


CHECKS = {
    "data": (60, check_data, "synthetic X-ray, labelled digit, CT volume and segmentation shards"),
    "dist": (60, check_dist, "every pretrain.dist helper + both object collectives on a 1-process NCCL group"),
    "attention": (60, check_attention, "xformers vs sdpa fwd/bwd in bf16, preset head dims and packed crops"),
    "train_mae": (90, check_train_mae, "MAE 10 steps bf16 ZeRO-2 NCCL: falling finite loss, complete checkpoint"),
    "train_dinov2": (100, check_train_dinov2, "DINOv2 10 steps ZeRO-0, packed crops, drop path, probes"),
    "train_videomae": (90, check_train_videomae, "VideoMAE V2 on CT 10 steps ZeRO-3, activation checkpointing"),
    "gram": (90, check_gram, "DINOv2 + Gram anchoring 10 steps bf16 ZeRO-3: snapshot at 2, refresh at 6, step syncs, "
             "dense probe"),
    "stages": (90, check_stages, "DINOv2 + Gram 10 steps bf16 ZeRO-3 with a stage at 5: 64 px crops, batch 4, lower lr"),
    "hiend": (90, check_hiend, "Hi-End-MAE decoder on CT 10 steps bf16 ZeRO-3; cross-attention xformers vs sdpa; syncs"),
    "decode": (90, check_decode, "data.decode_device=cuda: nvjpeg tiles vs the CPU path, samples/s and equality"),
    "import": (60, check_import, "pretrain import of a timm ViT: GPU feature parity, 5 MAE steps from it"),
    "rope": (60, check_rope, "DINOv3 (rotary) import: GPU feature parity, 5 packed ZeRO-3 DINOv2 steps from it"),
    "stop_resume": (150, check_stop_resume, "stop signal mid-run (checkpoint written in the background), resume"),
    "checkpoint_copy": (40, check_checkpoint_copy, "background writer's pinned host copy of 1.2 GB: rate, exact"),
    "export": (150, check_export, "export --verify from the ZeRO-0 / 2 / 3 checkpoints"),
    "distill": (300, check_distill, "g2sd (replicated and partitioned teacher), dino, two students, post-hoc registers "
                "from the runs above: loss, export, syncs, one teacher pass a step"),
    "compile": (120, check_compile, "torch.compile of ViT-B blocks: graph breaks and recompiles"),
    "sync": (60, check_sync, "host syncs in one MAE and one DINOv2 step under set_sync_debug_mode"),
    "deterministic": (90, check_deterministic, "train.deterministic: DINOv2 twice, the same losses"),
    "planner": (120, check_planner, "planner estimate vs measured max_memory_reserved, ViT-L DINOv2"),
    "step_benchmark": (200, check_step_benchmark, "step benchmark samples/s and MFU, ViT-B/L MAE and DINOv2"),
    "apex": (30, check_apex, "apex fused LayerNorm where apex is installed"),
}
"""name -> (timeout in seconds, check, what it checks), in running order."""


def main(argv) -> int:
    name, work, result_path = argv
    sys.path.insert(0, REPO)
    try:
        result = CHECKS[name][1](work)
    except Exception as error:  # noqa: BLE001 - a failed check is a result, not a crash of the run
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"[-3000:],
                  "traceback": traceback.format_exc()[-3000:]}
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
