"""Peak host memory and wall time of `pretrain export` on a ViT-L ZeRO-3 checkpoint, on the CPU; writes JSON.

Trains a ViT-L MAE (MAE's 512-wide, 8-block decoder) for one step on 2 CPU processes (gloo) under
ZeRO-3 with the real CLI, at 32 px with 16 px patches so that the step is cheap and the weights are
ViT-L's, then runs ``pretrain export`` on that checkpoint in a fresh process and reports:

- the export's peak resident set (``VmHWM``, file-backed pages of memory-mapped checkpoint files
  included) and wall time;
- the fp32 bytes of the encoder and of the whole trainable module (encoder + decoder), and the peak
  as a multiple of each;
- where the peak comes from: the resident set sampled every few milliseconds beside the export, each
  sample filed under the call chain the export was in (its functions in ``pretrain/`` and the first
  library function below them), the largest sample of each chain.

Nothing is asserted; the numbers go to ``benchmarks/results/export_memory.json`` (or ``--out``). Pass
``--work`` to keep the checkpoint (about 4 GB) and measure another version of the code on the same one.

    .venv/bin/python benchmarks/export_memory.py --work /tmp/export_memory
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["model.size=L", "model.img_size=32", "model.patch_size=16", "objective.mae.decoder_dim=512",
         "objective.mae.decoder_depth=8", "objective.mae.decoder_heads=16"]
"""ViT-L (1024 wide, 24 blocks, 16 heads) with MAE's own decoder, at an image size that makes a step cheap."""
MIB = 1 << 20


def train(root: str) -> str:
    """One ZeRO-3 step of the ViT-L MAE on 2 processes (the demo's shards of pydicom's sample files); returns
    its checkpoint folder (the one already in ``root`` if there is one)."""
    from benchmarks.recipe_throughput import make_shards

    found = sorted(glob.glob(os.path.join(root, "vitl", "checkpoints", "step_*")))
    if found:
        return found[-1]
    args = [sys.executable, "-m", "pretrain.main", "train", "--nproc", "2", "--config",
            os.path.join(REPO, "pretrain", "configs", "mae_tiny_cpu.yaml"), f"output_dir={root}", "name=vitl",
            f"data.shards={make_shards(root)}", "distributed.zero_stage=3", "train.steps=1", "checkpoint.every=0",
            "train.image_every=0", "data.batch_size=1", "data.num_workers=0", "tracking.enabled=false", *MODEL]
    subprocess.run(args, cwd=REPO, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return sorted(glob.glob(os.path.join(root, "vitl", "checkpoints", "step_*")))[-1]


def weight_bytes(checkpoint: str) -> dict:
    """fp32 bytes of the encoder and of the trainable module of the checkpoint's objective (built on meta)."""
    import torch

    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    with torch.device("meta"):
        objective = build_objective(load_config(os.path.join(checkpoint, "config.yaml")))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"encoder_mib": round(4 * count(objective.encoder()) / MIB, 1),
            "trainable_mib": round(4 * count(objective.trainable()) / MIB, 1)}


def status_mib(*fields: str) -> list:
    """``/proc/self/status`` fields (VmRSS, VmHWM, RssAnon, RssFile) in MiB."""
    with open("/proc/self/status") as handle:
        values = dict(line.split(":", 1) for line in handle)
    return [int(values[field].split()[0]) / 1024 for field in fields]


def chain(frame) -> str:
    """The export's call chain at ``frame``: its functions in pretrain/ (outermost first) and the first
    library function they called."""
    names, below = [], None
    while frame is not None:
        code = frame.f_code
        if f"{os.sep}pretrain{os.sep}" in code.co_filename and "site-packages" not in code.co_filename:
            names.append(code.co_name)
        elif not names:
            below = code.co_name
        frame = frame.f_back
    return " > ".join(reversed(names)) + (f" > {below}" if below else "")


def sampled(work, period: float = 0.005, top: int = 12) -> dict:
    """Run ``work()`` while a thread samples the resident set; the ``top`` call chains by their largest sample,
    each with that sample's resident MiB: all, anonymous (tensors, heap) and file-backed (mapped files)."""
    main, peaks, done = threading.main_thread().ident, {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main)
            label = chain(frame) if frame is not None else "?"
            rss, anon, mapped = status_mib("VmRSS", "RssAnon", "RssFile")
            if rss > peaks.get(label, {"rss": 0.0})["rss"]:
                peaks[label] = {"rss": round(rss), "anon": round(anon), "file": round(mapped)}
            time.sleep(period)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return dict(sorted(peaks.items(), key=lambda item: -item[1]["rss"])[:top])


def child(checkpoint: str, out: str) -> None:
    """The measured process: ``pretrain export CHECKPOINT OUT``; prints its JSON report."""
    sys.path.insert(0, REPO)
    from pretrain.main import main

    start = time.perf_counter()
    phases = sampled(lambda: main(["export", checkpoint, out]))
    wall = time.perf_counter() - start
    print(json.dumps({"peak_rss_mib": round(status_mib("VmHWM")[0]), "wall_s": round(wall, 1), "phases_mib": phases}))


def measure(checkpoint: str, out: str) -> dict:
    """The export in a fresh process: peak, wall time and phases."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", checkpoint, out], cwd=REPO,
                            check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Make (or reuse) the checkpoint, measure its export and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the shards, the run and the bundle (kept; default: a temporary one)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/export_memory.json)")
    parser.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    sys.path.insert(0, REPO)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.work or scratch
        checkpoint = train(root)
        weights = weight_bytes(checkpoint)
        export = measure(checkpoint, os.path.join(root, "bundle"))
    peak = export["peak_rss_mib"]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "MAE ViT-L/16 at 32 px (decoder 512 x 8), fp32, ZeRO-3 on 2 processes, 1 step",
        "weights": weights,
        "export": export,
        "peak_over_encoder": round(peak / weights["encoder_mib"], 2),
        "peak_over_trainable": round(peak / weights["trainable_mib"], 2),
    }
    from benchmarks.report import write_report

    write_report(report, args.out or os.path.join(REPO, "benchmarks", "results", "export_memory.json"))


if __name__ == "__main__":
    main()
