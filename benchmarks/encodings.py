"""What ``pretrain shards xray --encoding`` and ``--max-side`` cost and save: bytes and decode time per sample.

The same X-rays (512 x 512 16-bit PNG files, smooth with a little noise, like radiographs more than like
random pixels) are converted in one process with each encoding (png, npy, jpeg), at full size and with
``--max-side 256``. Reported per setting: conversion samples/s, and the medians ``pretrain shards inspect``
reports (stored bytes per sample, decode milliseconds per sample), with each setting's ratio to full-size
png measured in the same run.

    .venv/bin/python benchmarks/encodings.py          # about a minute here
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import RESULTS, write_report  # noqa: E402

SETTINGS = [(encoding, max_side) for max_side in (None, 256) for encoding in ("png", "npy", "jpeg")]


def make_xrays(folder: str, count: int, side: int = 512) -> str:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:side, 0:side] / side
    for index in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        image = 0.3 * rows + 0.6 * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / 0.04)
        image = image + 0.01 * rng.standard_normal((side, side))
        image = (image - image.min()) / (image.max() - image.min())
        Image.fromarray((image * 65535).astype(np.uint16)).save(os.path.join(folder, f"x{index:03d}.png"))
    return folder


def measure(src: str, out: str, encoding: str, max_side) -> dict:
    from data_pipeline.inspect_shards import inspect_shards
    from data_pipeline.writers import write_xray_shards

    start = time.perf_counter()
    manifest = write_xray_shards(src, out, samples_per_shard=64, progress=False, encoding=encoding,
                                 max_side=max_side)
    seconds = time.perf_counter() - start
    entry = inspect_shards(out)["modalities"]["xray"]
    return {"encoding": encoding, "max_side": max_side, "samples": manifest["total_samples"],
            "convert_samples_per_s": round(manifest["total_samples"] / seconds, 1),
            "bytes_per_sample": entry["bytes_per_sample"]["median"],
            "decode_ms_per_sample": entry["decode_ms_per_sample"]["median"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(RESULTS, "encodings.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        src = make_xrays(os.path.join(root, "src"), args.files)
        rows = [measure(src, os.path.join(root, f"{encoding}_{max_side}"), encoding, max_side)
                for encoding, max_side in SETTINGS]
    base = rows[0]
    for row in rows:
        row["bytes_vs_png_full"] = round(row["bytes_per_sample"] / base["bytes_per_sample"], 3)
        row["decode_vs_png_full"] = round(row["decode_ms_per_sample"] / base["decode_ms_per_sample"], 3)
        print(row, flush=True)
    write_report({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": platform.processor()},
                  "files": args.files, "source": "512 x 512 16-bit PNG X-rays (smooth, 1% noise)",
                  "settings": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
