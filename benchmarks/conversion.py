"""Conversion throughput (``pretrain shards``) on 1 and 2 worker processes per kind; writes JSON.

For each kind (X-ray 512x512 16-bit PNG files, CT NIfTI volumes, whole-slide images cut into 224 px tiles,
video clips re-encoded with ``max_side``), the same sources are converted ``--repeats`` times with
``workers=1`` and ``workers=2`` (interleaved), each time into a fresh folder, timing the whole conversion
(plan, parts, merge; the spawn of the worker processes included, as a user sees it). Reported per kind and
worker count: the median wall time, files/s and samples/s, and ``speedup`` (2 workers over 1, medians of
the same run). The shards are also checked to be byte-identical across worker counts.

    .venv/bin/python benchmarks/conversion.py                       # all kinds, ~8 minutes here
    .venv/bin/python benchmarks/conversion.py --kinds xray ct --repeats 1
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import RESULTS, write_report  # noqa: E402

SOURCES = {  # kind -> (files, samples per shard, options): about 10-20 s a kind on one worker here
    "xray": (384, 16, {}),
    "ct": (160, 2, {}),
    "wsi": (40, 64, {"tile_size": 224, "mpp": 0.5}),
    "video": (96, 2, {"max_side": 160}),
}


def make_sources(kind: str, folder: str, count: int) -> str:
    import numpy as np
    from PIL import Image

    from data_pipeline import synthetic

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        if kind == "xray":
            Image.fromarray((rng.random((512, 512)) * 65535).astype(np.uint16)).save(f"{folder}/x{index:03d}.png")
        elif kind == "ct":
            synthetic.write_nifti(f"{folder}/v{index:03d}.nii.gz", shape=(64, 192, 192), seed=index)
        elif kind == "wsi":
            synthetic.write_slide(f"{folder}/s{index:03d}.tif", width=4096, height=3072, seed=index)
        else:
            synthetic.write_video(f"{folder}/c{index:03d}.mp4", frames=96, width=320, height=240, seed=index)
    return folder


def shard_bytes(out: str) -> dict:
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))
            if name.endswith(".tar")}


def measure(kind: str, src: str, root: str, workers: int) -> tuple:
    """(seconds, manifest, shard bytes) of one conversion into a fresh folder."""
    from data_pipeline.conversion import convert

    count, per_shard, options = SOURCES[kind]
    out = os.path.join(root, f"{kind}_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = convert(kind, src, out, per_shard, workers=workers, progress=False, **options)
    return time.perf_counter() - start, manifest, shard_bytes(out)


def bench(kind: str, root: str, repeats: int) -> dict:
    count = SOURCES[kind][0]
    src = make_sources(kind, os.path.join(root, f"raw_{kind}"), count)
    times = {1: [], 2: []}
    outputs = {}
    for _ in range(repeats):
        for workers in (1, 2):
            seconds, manifest, data = measure(kind, src, root, workers)
            times[workers].append(seconds)
            outputs[workers] = data
    samples = manifest["total_samples"]
    row = {"files": count, "samples": samples, "identical_across_workers": outputs[1] == outputs[2]}
    for workers, runs in times.items():
        median = statistics.median(runs)
        row[f"w{workers}"] = {"seconds": round(median, 3), "files_per_s": round(count / median, 2),
                              "samples_per_s": round(samples / median, 2), "runs": [round(t, 3) for t in runs]}
    row["speedup"] = round(row["w1"]["seconds"] / row["w2"]["seconds"], 3)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "conversion.json"))
    args = parser.parse_args(argv)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))},
              "repeats": args.repeats, "kinds": {}}
    with tempfile.TemporaryDirectory() as root:
        for kind in args.kinds:
            report["kinds"][kind] = bench(kind, root, args.repeats)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
