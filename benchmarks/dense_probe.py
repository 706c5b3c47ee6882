"""Dense-probe mIoU of the dense-feature methods against their plain objectives, the same steps on the demo data.

Pretraining data: `make demo`'s X-ray shards (pydicom's sample DICOMs). Dense probe set: synthetic 64 px
segmentation images (a disc and a square on a striped background, 3 classes; data_pipeline.synthetic), probed
with a linear per-patch classifier on frozen patch tokens (pretrain/probes.py) before the first step (the
untrained encoder) and at the end. Pairs, each the same recipe, seed and steps on 2 CPU processes: MAE with the
light decoder against Hi-End-MAE's hierarchical one (mae_tiny_cpu, 4 blocks), and DINOv2 without and with Gram
anchoring (dinov2_tiny_cpu; the Gram teacher taken at 1/6 of the run and retaken twice).

    .venv/bin/python benchmarks/dense_probe.py      # about 10 minutes here
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.report import RESULTS, write_report  # noqa: E402

CONFIGS = os.path.join(REPO, "pretrain", "configs")
COMMON = ["data.num_workers=1", "train.log_every=10", "checkpoint.every=0", "tracking.backend=jsonl"]


def runs(steps: int) -> dict:
    """name -> (recipe, overrides) of the compared runs."""
    gram = ["objective.dinov2.gram.weight=1.0", f"objective.dinov2.gram.start_step={steps // 6}",
            f"objective.dinov2.gram.refresh_every={steps // 3}", "objective.dinov2.gram.max_refreshes=2"]
    return {"mae_light": ("mae_tiny_cpu", ["model.depth=4"]),
            "mae_hierarchical": ("mae_tiny_cpu", ["model.depth=4", "objective.mae.decoder=hierarchical"]),
            "dinov2": ("dinov2_tiny_cpu", []),
            "dinov2_gram": ("dinov2_tiny_cpu", gram)}


def train(out: str, name: str, recipe: str, steps: int, *overrides: str) -> dict:
    """A 2-process run; its dense-probe mIoU before the first step and at the end, and its first / last loss."""
    subprocess.run([sys.executable, "-m", "pretrain.main", "train", "--nproc", "2", "--config",
                    os.path.join(CONFIGS, f"{recipe}.yaml"), *COMMON, f"output_dir={out}", f"name={name}",
                    f"train.steps={steps}", f"probe.every={steps}", *overrides], cwd=REPO, check=True,
                   capture_output=True)
    with open(os.path.join(out, name, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    dense = [row["probe_dense_miou"] for row in rows if "probe_dense_miou" in row]
    losses = [row["loss"] for row in rows if "loss" in row]
    return {"miou_untrained": round(dense[0], 4), "miou": round(dense[-1], 4), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4)}


def data(root: str) -> dict:
    """The demo's X-ray shards and the segmentation probe set."""
    import pydicom.data

    from data_pipeline.synthetic import write_segmentation
    from data_pipeline.writers import write_xray_shards

    sources = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    write_xray_shards(sources, os.path.join(root, "demo"), 8, progress=False)
    for index in range(200):
        write_segmentation(os.path.join(root, "raw_seg"), index)
    write_xray_shards(os.path.join(root, "raw_seg", "images"), os.path.join(root, "seg"), 100, progress=False,
                      masks=os.path.join(root, "raw_seg", "masks"))
    return {"demo": os.path.join(root, "demo"), "seg": os.path.join(root, "seg")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=os.path.join(RESULTS, "dense_probe.json"))
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="dense_probe_")
    sets = data(os.path.join(work, "data"))
    per_seed = []
    for seed in args.seeds:
        shared = [f"data.shards={sets['demo']}", f"probe.shards={sets['seg']}", f"seed={seed}"]
        per_seed.append({name: train(os.path.join(work, f"runs_{seed}"), name, recipe, args.steps, *shared, *extra)
                         for name, (recipe, extra) in runs(args.steps).items()})
    mean = {name: {key: round(sum(seed[name][key] for seed in per_seed) / len(per_seed), 4)
                   for key in per_seed[0][name]} for name in per_seed[0]}
    report = {"machine": platform.processor() or platform.machine(), "steps": args.steps, "seeds": args.seeds,
              "pretraining": "make demo's X-ray shards (pydicom sample DICOMs)",
              "probe_set": "200 synthetic 64 px segmentation images, 3 classes (hashed bank / query split)",
              "mean": mean, "per_seed": per_seed}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
