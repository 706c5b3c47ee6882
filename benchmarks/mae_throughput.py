"""Measure MAE training and loader throughput on this machine and write JSON.

Runs the real CLI (``pretrain train``) on shards made from pydicom's sample DICOMs for
1 process ZeRO-0 and 2 processes ZeRO-2 / ZeRO-3, reads the per-step ``step_time_s`` from
each run's MLflow store, and times the loader alone. Nothing is asserted; the numbers go to
``benchmarks/results/mae_throughput.json`` (or ``--out``).

    .venv/bin/python benchmarks/mae_throughput.py --steps 40
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = [("1proc_zero0", 1, 0), ("2proc_zero2", 2, 2), ("2proc_zero3", 2, 3)]


def make_shards(root: str) -> str:
    """Shards of pydicom's sample files (the demo's data)."""
    import pydicom.data

    from data_pipeline.write_shards import write_xray_shards

    src = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    out = os.path.join(root, "shards")
    write_xray_shards(src, out, samples_per_shard=8, progress=False)
    return out


def train(root: str, shards: str, name: str, nproc: int, stage: int, steps: int) -> dict:
    """One CLI run; returns timing statistics from its MLflow store."""
    from mlflow.tracking import MlflowClient

    args = [sys.executable, "-m", "pretrain.main", "train", "--nproc", str(nproc), "--config",
            os.path.join(REPO, "pretrain", "configs", "mae_tiny_cpu.yaml"), f"output_dir={root}", f"name={name}",
            f"data.shards={shards}", f"distributed.zero_stage={stage}", f"train.steps={steps}",
            "checkpoint.every=0", "train.image_every=0", f"data.batch_size={8 // nproc}"]
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    client = MlflowClient(tracking_uri=f"sqlite:///{os.path.join(root, name)}/mlflow.db")
    run_id = client.search_runs(client.search_experiments()[0].experiment_id)[0].info.run_id
    times = [m.value for m in sorted(client.get_metric_history(run_id, "step_time_s"), key=lambda m: m.step)]
    steady = times[5:] or times
    median = statistics.median(steady)
    return {"processes": nproc, "zero_stage": stage, "global_batch": 8, "steps": steps,
            "median_step_s": round(median, 4), "steps_per_s": round(1 / median, 2),
            "samples_per_s": round(8 / median, 1), "wall_s_including_startup": round(wall, 1)}


def loader(shards: str, batches: int) -> dict:
    """Decode + augment throughput of the stream alone, in this process."""
    from data_pipeline.pipelines import build_loader
    from pretrain.config import load_config
    from pretrain.objectives import DataSpec

    cfg = load_config(os.path.join(REPO, "pretrain", "configs", "mae_tiny_cpu.yaml"), [f"data.shards={shards}",
                                                                                       "data.num_workers=0"])
    data, _, _ = build_loader(cfg.data, DataSpec("single", cfg.model.img_size, 1), 0, 0, 1)
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
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "mae_throughput.json"))
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    with tempfile.TemporaryDirectory() as root:
        shards = make_shards(root)
        report = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "model": "ViT tiny (64 wide, 2 blocks), 64 px, patch 8, MAE mask 0.75, fp32",
            "train": {name: train(root, shards, name, nproc, stage, args.steps) for name, nproc, stage in PLANS},
            "loader": loader(shards, 50),
        }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
