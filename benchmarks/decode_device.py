"""The CPU path vs the device path of pathology JPEG tiles (``data.decode_device``): samples/s and equality.

The device path (data_pipeline/device_decode.py) leaves the tiles encoded in the loader workers and
decodes each batch in the training process (``decode_jpeg`` on ``--device``, nvjpeg on a GPU), where the
views are made from the choices the workers drew. Measured on the same shards, through the real
``build_loader``, for a single 224 px view (MAE) and DINOv2's multi-crop (2 x 224 + 8 x 96):

* ``cpu_w{W}`` / ``device_w{W}``: samples/s with W workers (after a warm-up batch per worker; on a GPU
  the device's queue is drained before the clock stops);
* ``max_abs`` / ``mean_abs``: the device path's views against the CPU path's, in [0, 1] pixel units,
  with :data:`data_pipeline.device_decode.TOLERANCE`'s verdict.

    .venv/bin/python benchmarks/decode_device.py --device cpu --seconds 4   # the path's cost without a GPU

`make gpu-check` runs :func:`check` (the ``decode`` check) with the device cuda.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import RESULTS, write_report  # noqa: E402

SPECS = {  # name -> DataSpec kwargs
    "single": dict(kind="single", img_size=224, in_chans=3),
    "multicrop": dict(kind="multicrop", img_size=224, in_chans=3, local_crops=8, local_size=96),
}
BATCH = 32


def make_tiles(root: str, slides: int = 4, tiles_per_slide: int = 32) -> str:
    """224 px synthetic H&E JPEG tiles in shards of 32 under ``root`` (made once); returns the shard folder."""
    from data_pipeline.write_shards import write_tile_shards
    from tests.conftest import make_tile_folder

    shards = os.path.join(root, "tile_shards")
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        make_tile_folder(os.path.join(root, "raw_tiles"), slides, tiles_per_slide, size=224)
        write_tile_shards(os.path.join(root, "raw_tiles"), shards, samples_per_shard=32, progress=False)
    return shards


@functools.lru_cache(maxsize=None)
def data_config(shards: str, workers: int, batch_size: int = BATCH):
    """The data config of the tile shards (cached: loading a config takes seconds on a busy 2-core machine)."""
    from pretrain.config import load_config

    return load_config(None, [f"data.shards={shards}", "data.modality=pathology", f"data.batch_size={batch_size}",
                              f"data.num_workers={workers}", "data.split_by=sample", "data.shuffle_buffer=16",
                              "model.in_chans=3", "data.transforms.mean=[0.7,0.55,0.7]",
                              "data.transforms.std=[0.15,0.2,0.15]", "data.transforms.hflip=true",
                              "data.transforms.vflip=true", "data.transforms.rotate90=true"]).data


def _drain(device) -> None:
    import torch

    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rate(shards: str, spec: str, workers: int, seconds: float, device=None, batch_size: int = BATCH) -> float:
    """Samples/s of the loader (``device`` None: the CPU path; else the device path on ``device``)."""
    from data_pipeline.pipelines import build_loader
    from pretrain.objectives.base import DataSpec

    loader = build_loader(data_config(shards, workers, batch_size), DataSpec(**SPECS[spec]), seed=0, rank=0,
                          world_size=1, decode_on=device)[0]
    batches = iter(loader)
    for _ in range(max(1, workers)):
        next(batches)
    _drain(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["key"])
    _drain(device)
    return round(count / (time.perf_counter() - start), 1)


def equality(shards: str, spec: str, device, batches: int = 3) -> dict:
    """Largest and mean absolute difference of the device path's views from the CPU path's ([0, 1] units)."""
    import torch

    from data_pipeline.device_decode import TOLERANCE
    from data_pipeline.pipelines import build_loader
    from pretrain.objectives.base import DataSpec

    cfg = data_config(shards, 0, 8)
    std = torch.tensor(cfg.transforms.std)[:, None, None]
    made = [list(itertools.islice(build_loader(cfg, DataSpec(**SPECS[spec]), seed=1, rank=0, world_size=1,
                                               decode_on=on)[0], batches)) for on in (None, device)]
    worst, total, count = 0.0, 0.0, 0
    for cpu, dev in zip(*made):
        assert cpu["key"] == dev["key"]
        for name, value in cpu.items():
            if torch.is_tensor(value) and value.is_floating_point():
                diff = ((value - dev[name].cpu()) * std).abs()
                worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    mean = total / count
    return {"max_abs": round(worst, 6), "mean_abs": round(mean, 7), "max_abs_levels": round(worst * 255, 3),
            "within_tolerance": worst <= TOLERANCE["max_abs"] and mean <= TOLERANCE["mean_abs"]}


def measure(root: str, device, seconds: float, workers=(0, 2), specs=tuple(SPECS)) -> dict:
    """Rates of both paths and equality for every spec, on shards made under ``root``."""
    shards = make_tiles(root)
    out = {"device": str(device), "batch_size": BATCH}
    for spec in specs:
        row = {f"cpu_w{w}": rate(shards, spec, w, seconds) for w in workers}
        row.update({f"device_w{w}": rate(shards, spec, w, seconds, device) for w in workers})
        row.update(equality(shards, spec, device))
        out[spec] = row
    return out


def check(work: str) -> dict:
    """The ``decode`` check of `make gpu-check`: both paths' samples/s on the GPU machine, nvjpeg's views equal
    to the CPU path's within tolerance."""
    out = measure(os.path.join(work, "data"), "cuda", seconds=4.0, workers=(2,))
    out["ok"] = all(out[spec]["within_tolerance"] for spec in SPECS)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where the device path decodes (cpu: its cost without a GPU)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--data", default=os.path.join(RESULTS, "decode_device_data"))
    parser.add_argument("--out", default=os.path.join(RESULTS, "decode_device.json"))
    args = parser.parse_args(argv)
    out = measure(args.data, args.device, args.seconds, tuple(args.workers))
    out["cpus"] = os.cpu_count()
    print({k: v for k, v in out.items()}, flush=True)
    write_report(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
