"""Loader throughput per modality vs the decode-only rate of the same decoder; writes JSON.

For each modality (X-ray 16-bit PNG, pathology JPEG tiles cut from synthetic slides, CT volumes
as 3D crops and as 2.5D slabs, video clips), on the same shards (several per reader, so the
default ``data.split_by=shard`` applies with 2 workers):

* ``pipeline_w{0,1,2}``: samples/s of the real DataLoader (``build_loader``) with 0, 1 and 2
  workers: tar reading, shuffle buffer, decode, views, collation;
* ``decode_only_p{1,2}``: samples/s of the same modality decoder in a tight loop over samples
  already in memory, in 1 and in 2 processes at once (one torch thread each, like a worker);
* ``ratio``: ``pipeline_w2 / decode_only_p2`` (target: at least 0.8);
* ``reused_buffers_w{1,2}``: the fraction of batches that came in reused shared buffers
  (data_pipeline/batch_memory.py) rather than fresh shared memory.
* pathology only, ``device_w{0,2}``: samples/s of the device path (``data.decode_device``: workers leave
  the tiles encoded, the training process decodes and makes the views on ``device``: the GPU where
  there is one, else the CPU, which shows the path's cost; benchmarks/decode_device.py has more).

    .venv/bin/python benchmarks/loader.py                  # all modalities, ~8 minutes here
    .venv/bin/python benchmarks/loader.py --modalities ct video --seconds 5 --repeats 1

Every number is measured ``--repeats`` times, interleaved with the others, and the median is
reported (this 2-core machine's rates drift by up to 15% between runs); all runs are kept.

It also writes ``--rates-out`` (default benchmarks/results/loader_rates.json, committed), the
per-core rates ``pretrain plan`` divides the samples/s a GPU needs by: for each case, samples/s of
the real loader in one process with one torch thread and no workers
(:func:`pretrain.plan_loader.measure_rate`), keyed by modality / view kind / sizes
(:func:`pretrain.plan_loader.rate_key`), with the CPU it was measured on. Besides the cases above it
measures the views of the shipped recipes that they lack (:data:`RATE_CASES`); entries of cases not
measured in this run are kept. ``--rates-only`` measures just those rates:

    .venv/bin/python benchmarks/loader.py --rates-only --seconds 3 --repeats 1
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import RESULTS, write_report  # noqa: E402

BATCH = 8
"""Samples per batch (the default of --batch-size)."""

CASES = {  # name -> (modality, DataSpec kwargs, data overrides)
    "xray": ("xray", dict(kind="single", img_size=224, in_chans=1), []),
    "pathology": ("pathology", dict(kind="single", img_size=224, in_chans=3), []),
    "ct_volume": ("ct", dict(kind="volume", img_size=96, in_chans=1, depth=32), []),
    "ct_slab": ("ct", dict(kind="single", img_size=224, in_chans=3), []),
    "video": ("video", dict(kind="clip", img_size=160, in_chans=3, frames=16), ["data.video.stride=2"]),
}
RATE_CASES = {  # per-core rates only: the views of the shipped recipes (pretrain/configs) that CASES lacks
    "xray_multicrop": ("xray", dict(kind="multicrop", img_size=224, in_chans=1, local_crops=8, local_size=98), []),
    "pathology_multicrop": ("pathology", dict(kind="multicrop", img_size=224, in_chans=3, local_crops=8,
                                              local_size=96), []),
    "ct_volume_160": ("ct", dict(kind="volume", img_size=160, in_chans=3, depth=64),
                      ["data.ct.target_spacing=[2.5,1.5,1.5]", "data.ct.windows=[[40,400],[-600,1500],[400,1800]]"]),
    "video_224": ("video", dict(kind="clip", img_size=224, in_chans=3, frames=16), ["data.video.stride=4"]),
}
ALL_CASES = {**CASES, **RATE_CASES}
DATA = {  # what make_data writes, as the rates file says
    "xray": "synthetic shards: 512 x 512 16-bit PNG noise",
    "pathology": "synthetic shards: 224 px JPEG tiles at 0.5 mpp cut from 4096 x 3072 synthetic slides",
    "ct": "synthetic shards: 80 x 256 x 256 int16 volumes at 2 x 0.8 x 0.8 mm",
    "video": "synthetic shards: 96-frame 320 x 240 mp4 clips",
}


def make_data(root: str) -> dict:
    """Shards per modality under ``root`` (made once, then reused)."""
    import numpy as np
    from PIL import Image

    from data_pipeline import synthetic
    from data_pipeline.writers import WRITERS

    folders = {}
    # several shards per reader, so that the default data.split_by=shard applies with 2 workers
    for modality, count, per_shard in (("xray", 64, 8), ("pathology", 8, 32), ("ct", 16, 4), ("video", 16, 4)):
        out = os.path.join(root, modality)
        folders[modality] = out
        if os.path.exists(os.path.join(out, "manifest.json")):
            continue
        raw = os.path.join(root, f"raw_{modality}")
        os.makedirs(raw, exist_ok=True)
        rng = np.random.default_rng(0)
        for index in range(count):
            if modality == "xray":
                image = (rng.random((512, 512)) * 65535).astype(np.uint16)
                Image.fromarray(image).save(os.path.join(raw, f"x{index}.png"))
            elif modality == "pathology":
                synthetic.write_slide(os.path.join(raw, f"s{index}.tif"), width=4096, height=3072, seed=index)
            elif modality == "ct":
                synthetic.write_nifti(os.path.join(raw, f"v{index}.nii.gz"), shape=(80, 256, 256),
                                      spacing=(2.0, 0.8, 0.8), seed=index)
            else:
                synthetic.write_video(os.path.join(raw, f"c{index}.mp4"), frames=96, width=320, height=240,
                                      seed=index)
        kind = "wsi" if modality == "pathology" else modality
        extra = {"tile_size": 224, "mpp": 0.5} if kind == "wsi" else {}
        WRITERS[kind](raw, out, samples_per_shard=per_shard, progress=False, **extra)
    return folders


def config(case: str, shards: str, workers: int, batch_size: int = BATCH):
    from pretrain.config import load_config

    modality, spec, extra = ALL_CASES[case]
    chans = spec["in_chans"]
    return load_config(None, [f"data.shards={shards}", f"data.modality={modality}", f"data.batch_size={batch_size}",
                              f"data.num_workers={workers}", "data.shuffle_buffer=16",
                              f"model.in_chans={chans}", f"data.transforms.mean={[0.5] * chans}",
                              f"data.transforms.std={[0.25] * chans}", *extra])


def pipeline_rate(case: str, shards: str, workers: int, seconds: float, batch_size: int = BATCH,
                  decode_on: Optional[str] = None) -> tuple:
    """(samples/s of the DataLoader after a warm-up batch per worker, the fraction of batches that
    came in reused shared buffers, None without workers); ``decode_on``: the device path's device."""
    import torch

    from data_pipeline.pipelines import build_loader
    from pretrain.objectives.base import DataSpec

    cfg = config(case, shards, workers, batch_size)
    loader, _, _ = build_loader(cfg.data, DataSpec(**CASES[case][1]), seed=0, rank=0, world_size=1,
                                decode_on=decode_on)
    drain = torch.cuda.synchronize if decode_on == "cuda" else (lambda: None)  # the views made on the GPU
    batches = iter(loader)
    for _ in range(max(1, workers)):
        next(batches)
    drain()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["key"])
    drain()
    rate = count / (time.perf_counter() - start)
    reused = round(loader.reused / (loader.reused + loader.fresh), 3) if workers else None
    del batches, loader
    return rate, reused


def _raw_samples(shards: str, limit: int = 64) -> list:
    from webdataset.tariterators import group_by_keys

    from data_pipeline.shards import resolve_shards, tar_members

    samples = []
    for url in resolve_shards(shards).urls:  # fields as bytes in memory (local shards give views of the file)
        samples.extend({k: bytes(v) if isinstance(v, memoryview) else v for k, v in raw.items()}
                       for raw in group_by_keys(tar_members(url)))
        if len(samples) >= limit:
            break
    return samples[:limit]


def _decode_loop(args) -> tuple:
    case, shards, seconds = args
    import torch

    from data_pipeline.modalities import build_preparer
    from data_pipeline.stream import stable_seed
    from pretrain.objectives.base import DataSpec

    torch.set_num_threads(1)
    cfg = config(case, shards, 0)
    decoder = build_preparer(cfg.data.sources[0], DataSpec(**CASES[case][1]))
    samples = _raw_samples(shards)
    decoder(samples[0], 0)
    count, start = 0, time.perf_counter()
    for index in itertools.count():
        decoder(samples[index % len(samples)], stable_seed(index))
        count += 1
        if time.perf_counter() - start >= seconds:
            break
    return count, time.perf_counter() - start


def decode_only_rate(case: str, shards: str, processes: int, seconds: float) -> float:
    """Samples/s of the decoder alone in ``processes`` parallel processes (summed)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_decode_loop, [(case, shards, seconds)] * processes)
    return sum(count / elapsed for count, elapsed in results)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; else what platform says)."""
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def per_core_rate(case: str, shards: str, seconds: float) -> float:
    """Samples/s of the real loader on one core (what `pretrain plan` divides by)."""
    from pretrain.objectives.base import DataSpec
    from pretrain.plan_loader import measure_rate

    return measure_rate(config(case, shards, 0), DataSpec(**ALL_CASES[case][1]), seconds)


def write_rates(runs: dict, path: str, seconds: float) -> None:
    """Merge the per-core rates of this run ({case: [samples/s, ...]}) into the rates file at ``path``."""
    import json

    from pretrain.objectives.base import DataSpec
    from pretrain.plan_loader import rate_key

    old = json.load(open(path)).get("rates", {}) if os.path.isfile(path) else {}
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    for case, values in runs.items():
        modality, spec, extra = ALL_CASES[case]
        old[rate_key(modality, DataSpec(**spec))] = {
            "case": case, "samples_per_s_per_core": statistics.median(values), "runs": values, "machine": machine,
            "data": DATA[modality] + (f" ({' '.join(extra)})" if extra else ""), "seconds_per_run": seconds,
            "measured": time.strftime("%Y-%m-%d")}
    write_report({"unit": "samples/s per core: the real loader (build_loader) in one process, one torch thread, "
                          "no workers, default transforms of the case", "machine": machine,
                  "rates": dict(sorted(old.items()))}, path)


def measure_case(case: str, shards: str, args, runs: dict) -> None:
    """One repeat of every number of ``case`` (a rate-only case: its per-core rate only), appended to ``runs``."""
    if case in CASES and not args.rates_only:
        for workers in (0, 1, 2):
            rate, reused = pipeline_rate(case, shards, workers, args.seconds, args.batch_size)
            runs.setdefault(f"pipeline_w{workers}", []).append(round(rate, 1))
            if reused is not None:
                runs.setdefault(f"reused_buffers_w{workers}", []).append(reused)
        for workers in ((0, 2) if CASES[case][0] == "pathology" else ()):
            rate, _ = pipeline_rate(case, shards, workers, args.seconds, args.batch_size, args.decode_on)
            runs.setdefault(f"device_w{workers}", []).append(round(rate, 1))
        for processes in (1, 2):
            rate = decode_only_rate(case, shards, processes, args.seconds)
            runs.setdefault(f"decode_only_p{processes}", []).append(round(rate, 1))
    runs.setdefault("per_core", []).append(round(per_core_rate(case, shards, args.seconds), 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modalities", nargs="+", default=list(ALL_CASES), choices=list(ALL_CASES))
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per number")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per number, interleaved; the median is reported (all are kept)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="samples per batch")
    parser.add_argument("--decode-on", default=None,
                        help="the device path's device (pathology device_w* rows; default cuda where there is one)")
    parser.add_argument("--data", default=os.path.join(RESULTS, "loader_data_v2"), help="where the shards are made")
    parser.add_argument("--out", default=os.path.join(RESULTS, "loader.json"))
    parser.add_argument("--rates-out", default=os.path.join(RESULTS, "loader_rates.json"),
                        help="per-core rates file for `pretrain plan` (merged with the one there)")
    parser.add_argument("--rates-only", action="store_true", help="measure the per-core rates only")
    args = parser.parse_args(argv)
    if args.decode_on is None:
        import torch

        args.decode_on = "cuda" if torch.cuda.is_available() else "cpu"
    folders = make_data(args.data)
    rows, per_core = {}, {}
    for case in args.modalities:
        shards = folders[ALL_CASES[case][0]]
        runs: dict = {}
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every number
            measure_case(case, shards, args, runs)
        per_core[case] = runs.pop("per_core")
        print(case, "per-core", per_core[case], flush=True)
        if case not in CASES or args.rates_only:
            continue
        row = {name: statistics.median(values) for name, values in runs.items()}
        row["ratio"] = round(row["pipeline_w2"] / row["decode_only_p2"], 3)
        row["runs"] = runs
        row["spec"] = CASES[case][1]
        if CASES[case][0] == "pathology":
            row["device"] = args.decode_on
        rows[case] = row
        print(case, {k: v for k, v in row.items() if k != "runs"}, flush=True)
    write_rates(per_core, args.rates_out, args.seconds)
    if args.rates_only:
        return 0
    write_report({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "batch_size": args.batch_size,
                  "seconds_per_number": args.seconds, "repeats": args.repeats, "modalities": rows,
                  "target": "pipeline_w2 >= 0.8 x decode_only_p2 for every modality (medians)"}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
