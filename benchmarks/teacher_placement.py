"""A distillation teacher replicated on every rank vs partitioned over the ranks (ZeRO-3, no optimizer): the
teacher's parameters each rank holds, its bytes, and the step's throughput, measured in one run.

The teacher is a ViT-B/8 at 64 px, 1 channel (random weights, saved by timm and brought in with `pretrain
import`); the student is distill_feature_tiny_cpu's (32 wide), trained on synthetic X-rays for ``--steps``
on 2 CPU processes with each placement. Throughput is the median samples/s of the second half of each run.

    .venv/bin/python benchmarks/teacher_placement.py     # about 2 minutes here
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.report import RESULTS, write_report  # noqa: E402


def make_teacher(work: str) -> str:
    import timm
    from timm.models import save_for_hf

    source, folder = os.path.join(work, "timm_vitb"), os.path.join(work, "teacher")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, patch_size=8, in_chans=1)
    save_for_hf(model, source, safe_serialization=True)
    subprocess.run([sys.executable, "-m", "pretrain.main", "import", source, folder], cwd=REPO, check=True,
                   capture_output=True)
    return folder


def run(work: str, shards: str, teacher: str, placement: str, steps: int) -> dict:
    name = f"student_{placement}"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.main", "train", "--nproc", "2", "--config",
         os.path.join(REPO, "pretrain", "configs", "distill_feature_tiny_cpu.yaml"), f"output_dir={work}",
         f"name={name}", f"data.shards={shards}", f"objective.distill.teacher={teacher}", "data.num_workers=1",
         f"objective.distill.teacher_placement={placement}", f"train.steps={steps}", "checkpoint.every=0",
         "tracking.backend=jsonl", "model.img_size=64"], cwd=REPO, check=True, capture_output=True, text=True)
    with open(os.path.join(work, name, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    rates = [row["samples_per_s"] for row in rows if "samples_per_s" in row][steps // 2:]
    held = re.findall(r"(\d+) of its (\d+) parameters on this rank", proc.stdout + proc.stderr)
    mine, whole = (int(held[0][0]), int(held[0][1])) if held else (None, None)
    return {"teacher_parameters_per_rank": mine, "teacher_parameters": whole,
            "median_samples_per_s": round(statistics.median(rates), 1), "last_loss": round([row["loss"] for row in rows if "loss" in row][-1], 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(RESULTS, "teacher_placement.json"))
    args = parser.parse_args(argv)
    from data_pipeline.writers import write_xray_shards
    from tests.conftest import make_xray_folder

    work = tempfile.mkdtemp(prefix="teacher_placement_")
    shards = os.path.join(work, "shards")
    write_xray_shards(make_xray_folder(os.path.join(work, "raw"), 64), shards, samples_per_shard=8, progress=False)
    teacher = make_teacher(work)
    report = {"machine": platform.processor() or platform.machine(), "steps": args.steps, "processes": 2,
              "teacher": "ViT-B/8 at 64 px (random weights)"}
    for placement in ("replicated", "partitioned"):
        report[placement] = run(work, shards, teacher, placement, args.steps)
    whole = report["partitioned"]["teacher_parameters"]
    report["replicated"].update(teacher_parameters_per_rank=whole, teacher_parameters=whole)  # every rank: all
    for placement in ("replicated", "partitioned"):
        held = report[placement]["teacher_parameters_per_rank"]
        report[placement]["teacher_fp32_mib_per_rank"] = round(held * 4 / 2**20, 1) if held else None
    report["throughput_ratio_partitioned_to_replicated"] = round(
        report["partitioned"]["median_samples_per_s"] / report["replicated"]["median_samples_per_s"], 3)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
