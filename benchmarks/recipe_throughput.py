"""Measure a shipped recipe's training step time and loader throughput on this machine; write JSON.

Runs the real CLI (``pretrain train``) on shards made from pydicom's sample DICOMs for each
plan (processes x ZeRO stage, same global batch of 8), reads the per-step ``step_time_s``
from each run's MLflow store, and times the loader alone (the recipe's own views). Nothing is
asserted; the numbers go to ``benchmarks/results/<recipe>_throughput.json`` (or ``--out``).

    .venv/bin/python benchmarks/recipe_throughput.py --recipe mae_tiny_cpu --steps 40
    .venv/bin/python benchmarks/recipe_throughput.py --recipe dinov2_tiny_cpu --plans 2proc_zero0,2proc_zero3
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = {"1proc_zero0": (1, 0, []), "2proc_zero0": (2, 0, []), "2proc_zero2": (2, 2, []), "2proc_zero3": (2, 3, []),
         "2proc_zero3_all_partitioned": (2, 3, ["distributed.zero3_persistence_threshold=0"])}
"""Plan name -> (processes, ZeRO stage, extra overrides). DeepSpeed keeps parameters under 1e5 elements
whole under ZeRO-3 by default, which at tiny size is all of them; the last plan partitions everything."""


def recipe_path(recipe: str) -> str:
    """The YAML of a shipped recipe."""
    return os.path.join(REPO, "pretrain", "configs", f"{recipe}.yaml")


def make_shards(root: str) -> str:
    """Shards of pydicom's sample files (the demo's data)."""
    import pydicom.data

    from data_pipeline.writers import write_xray_shards

    src = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    out = os.path.join(root, "shards")
    write_xray_shards(src, out, samples_per_shard=8, progress=False)
    return out


def train(root: str, shards: str, recipe: str, name: str, nproc: int, stage: int, extra: list, steps: int) -> dict:
    """One CLI run; returns timing statistics from its MLflow store."""
    from pretrain.tracking import mlflow_client

    args = [sys.executable, "-m", "pretrain.main", "train", "--nproc", str(nproc), "--config",
            recipe_path(recipe), f"output_dir={root}", f"name={name}", "data.split_by=sample",
            f"data.shards={shards}", f"distributed.zero_stage={stage}", f"train.steps={steps}",
            "checkpoint.every=0", "train.image_every=0", f"data.batch_size={8 // nproc}", *extra]
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    client = mlflow_client(f"sqlite:///{os.path.join(root, name)}/mlflow.db")
    run_id = client.search_runs(client.search_experiments()[0].experiment_id)[0].info.run_id
    times = [m.value for m in sorted(client.get_metric_history(run_id, "step_time_s"), key=lambda m: m.step)]
    steady = times[5:] or times
    median = statistics.median(steady)
    return {"processes": nproc, "zero_stage": stage, "global_batch": 8, "steps": steps,
            "median_step_s": round(median, 4), "steps_per_s": round(1 / median, 2),
            "samples_per_s": round(8 / median, 1), "wall_s_including_startup": round(wall, 1)}


def loader(shards: str, recipe: str, batches: int) -> dict:
    """Decode + augment throughput of the stream alone (the recipe's views), in this process."""
    from data_pipeline.pipelines import build_loader
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    cfg = load_config(recipe_path(recipe), [f"data.shards={shards}", "data.num_workers=0", "data.split_by=sample"])
    data, _, _ = build_loader(cfg.data, build_objective(cfg).data_spec(), 0, 0, 1)
    stream = iter(data)
    next(stream)
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    elapsed = time.perf_counter() - start
    return {"batches": batches, "batch_size": cfg.data.batch_size, "img_size": cfg.model.img_size,
            "samples_per_s": round(batches * cfg.data.batch_size / elapsed, 1)}


def main() -> None:
    """Run every measurement and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="mae_tiny_cpu", help="a recipe in pretrain/configs (no .yaml)")
    parser.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated, from {list(PLANS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/<recipe>_throughput.json)")
    args = parser.parse_args()
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"{args.recipe}_throughput.json")
    sys.path.insert(0, REPO)
    from pretrain.config import load_config

    cfg = load_config(recipe_path(args.recipe))
    with tempfile.TemporaryDirectory() as root:
        shards = make_shards(root)
        report = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "recipe": args.recipe,
            "model": f"ViT {cfg.model.size}, {cfg.model.img_size} px, patch {cfg.model.patch_size}, "
                     f"{cfg.objective.name}, {cfg.distributed.precision}",
            "train": {name: train(root, shards, args.recipe, name, *PLANS[name], steps=args.steps)
                      for name in args.plans.split(",")},
            "loader": loader(shards, args.recipe, 50),
        }
    from benchmarks.report import write_report

    write_report(report, out)


if __name__ == "__main__":
    main()
