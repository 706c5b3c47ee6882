"""How long checkpoint saves hold a run, written inline and from a host copy in the background; writes JSON.

Trains the same ViT-B MAE (224 px, 16 px patches, MAE's 512-wide 8-block decoder, fp32, batch 4, ZeRO-0,
one process: about 1.5 GB per checkpoint with the Adam moments) for ``--steps`` steps with a checkpoint
every ``--every``, once per ``checkpoint.writer`` (inline, background), one after the other in this run,
with the real CLI on synthetic X-ray shards. For each: the time each save held the run
(``checkpoint_save_s``) and its share of the wall time since the one before (``checkpoint_save_share``),
the background write's own time (``checkpoint_write_s``), the median step time of the steps between
checkpoints and of the steps right after one (a background write competes with them for the cores), and
the whole run's wall time. The final weights of both runs are compared (they must be equal).

Nothing is asserted; the numbers go to ``benchmarks/results/checkpoint_save.json`` (or ``--out``).

    .venv/bin/python benchmarks/checkpoint_save.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODEL = ["model.size=B", "model.img_size=224", "model.patch_size=16", "objective.mae.decoder_dim=512",
         "objective.mae.decoder_depth=8", "objective.mae.decoder_heads=16"]


def shards(root: str) -> str:
    from data_pipeline.writers import write_xray_shards
    from tests.conftest import make_xray_folder

    out = os.path.join(root, "shards")
    write_xray_shards(make_xray_folder(os.path.join(root, "raw"), 64), out, samples_per_shard=16, progress=False)
    return out


def run(root: str, data: str, writer: str, steps: int, every: int, threads: int) -> dict:
    name = f"vitb_{writer}"
    args = [sys.executable, "-m", "pretrain.main", "train", "--config",
            os.path.join(REPO, "pretrain", "configs", "mae_tiny_cpu.yaml"), *MODEL, f"output_dir={root}",
            f"name={name}", f"data.shards={data}", "data.batch_size=4", "data.num_workers=1",
            "distributed.zero_stage=0", f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.keep_last=2",
            f"checkpoint.writer={writer}", "tracking.backend=jsonl", "train.image_every=0", "train.log_every=1",
            "probe.every=0"]
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True,
                   env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(threads)))
    wall = time.perf_counter() - start
    with open(os.path.join(root, name, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    saves = [row for row in rows if "checkpoint_save_s" in row]
    writes = [row for row in rows if "checkpoint_write_s" in row]
    steps_after = {row["step"] + 1 for row in saves}
    timed = [row for row in rows if "step_time_s" in row and row["step"] > 1]
    return {
        "wall_s": round(wall, 1),
        "checkpoint_save_s": [round(row["checkpoint_save_s"], 3) for row in saves],
        "checkpoint_save_share": [round(row["checkpoint_save_share"], 4) for row in saves],
        "checkpoint_write_s": [round(row["checkpoint_write_s"], 3) for row in writes],
        "step_s_median": round(statistics.median(r["step_time_s"] for r in timed if r["step"] not in steps_after), 3),
        "step_s_after_save_median": round(statistics.median(
            [r["step_time_s"] for r in timed if r["step"] in steps_after] or [0.0]), 3),
        "checkpoint_bytes": sum(os.path.getsize(os.path.join(folder, f)) for folder in [
            os.path.join(root, name, "checkpoints", f"step_{steps:06d}")] for f in os.listdir(folder)),
    }


def same_weights(root: str, steps: int) -> bool:
    import torch

    tag = f"step_{steps:06d}"
    states = [torch.load(os.path.join(root, f"vitb_{w}", "checkpoints", tag, "mp_rank_00_model_states.pt"),
                         map_location="cpu", weights_only=False)["module"] for w in ("inline", "background")]
    return all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of the step (fewer than the cores leaves the writer a core, as on a GPU node)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "checkpoint_save.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        data = shards(root)
        results = {writer: run(root, data, writer, args.steps, args.every, args.threads) for writer in ("inline", "background")}
        results["same_final_weights"] = same_weights(root, args.steps)
    results["setup"] = {"model": "ViT-B MAE 224 px, decoder 512 x 8, fp32, batch 4, ZeRO-0, 1 process",
                        "steps": args.steps, "every": args.every, "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
