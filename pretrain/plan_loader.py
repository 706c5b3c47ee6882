"""The loader's cost per GPU, for ``pretrain plan``: the samples/s a step needs and the CPU cores that takes.

- Needed: a GPU running at ``mfu`` of its peak trains ``mfu x gpu_peak_tflops x 1e12 / FLOPs per sample``
  samples/s, the FLOPs per sample being the planner's training FLOPs of a micro-batch over its size
  (the FLOPs the runs' logged MFU counts).
- Cores needed per GPU: that rate over the per-core rate of the loader for this recipe's kind of data
  (modality, view kind and sizes: :func:`rate_key`), from a rates file written by
  ``benchmarks/loader.py`` (:data:`RATES`) or measured here on the recipe's own shards
  (:func:`measure_rate`: the real loader in this process, one torch thread, no workers). A mixture's
  rate is the weighted harmonic mean of its sources' rates (time per sample adds up by weight).
- Cores available per GPU: one task per GPU (``pretrain submit`` asks ``ntasks-per-node`` =
  processes_per_node), each with ``slurm.cpus_per_task`` cores; a local profile shares this machine's
  cores among its processes. The training process keeps :data:`TRAINER_CORES` of them; the
  DataLoader workers get the rest.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATES = os.path.join(REPO, "benchmarks", "results", "loader_rates.json")
"""The committed per-core rates (``benchmarks/loader.py`` writes it)."""
DEFAULT_MFU = 0.4
TRAINER_CORES = 1
"""Cores the training process keeps for itself (step launches, host-side work); the workers get the rest."""
MEASURE_SECONDS = 3.0
MEASURE_BATCH = 8
"""Samples per batch when measuring (collation cost per sample hardly depends on it; a small batch
keeps the warm-up short)."""
MEASURE_SHUFFLE = 16
"""Shuffle buffer when measuring: it fills before the first sample comes out and costs no decode."""
LEVERS = ("pre-resized shards (`pretrain shards xray --max-side N`, `pretrain shards video --max-side N`)",
          "fewer augment passes or crops per sample (e.g. objective.dinov2.local_crops_number)",
          "data.decode_device=cuda (GPU JPEG decode, pathology)",
          "more slurm.cpus_per_task")


@dataclass
class LoaderOptions:
    """How ``pretrain plan`` estimates the loader (``--mfu``, ``--loader-rates``, ``--measure-loader``)."""

    mfu: float = DEFAULT_MFU
    rates: Optional[str] = None
    """Rates file; None: :data:`RATES` where it exists."""
    measure: str = "never"
    """never (rates file only), auto (measure the recipe's shards when the file has no rate for the case)
    or always."""
    seconds: float = MEASURE_SECONDS


def check_mfu(mfu: float) -> float:
    """``mfu`` if it is in (0, 1], else a ValueError saying so."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu:g}: the model FLOPs utilisation is a fraction in (0, 1] (e.g. 0.4)")
    return mfu


def rate_key(modality: str, spec) -> str:
    """What a per-core rate is keyed by: modality / view kind / sizes (``xray/single/224``,
    ``xray/multicrop/224+8x98``, ``ct/volume/160x64``, ``video/clip/224x16``)."""
    size = str(spec.img_size)
    if spec.kind == "multicrop":
        size += f"+{spec.local_crops}x{spec.local_size}" + (f"+gram{spec.gram_size}" if spec.gram_size else "")
    elif spec.kind == "volume":
        size += f"x{spec.depth}"
    elif spec.kind == "clip":
        size += f"x{spec.frames}"
    return f"{modality}/{spec.kind}/{size}"


def load_rates(path: Optional[str]) -> tuple:
    """(path read or None, {key: entry}) of a rates file; the default file may be absent, a named one not."""
    path = path or (RATES if os.path.isfile(RATES) else None)
    if path is None:
        return None, {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--loader-rates {path}: no such file")
    with open(path) as handle:
        rates = json.load(handle).get("rates", {})
    return path, rates


def shown(path: str) -> str:
    """A path as the plan prints it: relative to the repository where it lies inside."""
    inside = os.path.abspath(path).startswith(REPO + os.sep)
    return os.path.relpath(path, REPO) if inside else path


def mixture_rate(rates: List[float], weights: List[float]) -> float:
    """Samples/s per core of a mixture: the sources' times per sample added by their share of the samples."""
    total = sum(weights)
    return 1.0 / sum(w / total / r for w, r in zip(weights, rates))


def source_keys(cfg, spec) -> List[str]:
    """The rate key of every source of the run (a source through an extra stem has its channels)."""
    from data_pipeline.mixture import source_spec

    return [rate_key(s.modality, source_spec(spec, s, dict(cfg.model.stems))) for s in cfg.data.sources]


def measure_rate(cfg, spec, seconds: float = MEASURE_SECONDS, seed: int = 0) -> float:
    """Samples/s of the real loader (``build_loader``: tar reading, shuffle, decode, views, masks, collation)
    over ``cfg``'s shards, in this process with one torch thread and no workers: one core's rate."""
    import torch

    from data_pipeline.pipelines import build_loader

    data = copy.deepcopy(cfg.data)
    data.num_workers, data.batch_size = 0, min(data.batch_size, MEASURE_BATCH)
    data.shuffle_buffer = min(data.shuffle_buffer, MEASURE_SHUFFLE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader, _, _ = build_loader(data, spec, seed=seed, rank=0, world_size=1, stems=dict(cfg.model.stems))
        batches = iter(loader)
        next(batches)  # warm-up: the shuffle buffer, first-use imports
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += len(next(batches)["key"])
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def per_core_rate(cfg, spec, options: LoaderOptions) -> dict:
    """{'rate', 'source', 'keys'}: the per-core rate of this run's data and where it came from
    (rate None and the reason in 'source' where none is known)."""
    keys = source_keys(cfg, spec)
    path, rates = load_rates(options.rates)
    known = [rates[key] for key in keys if key in rates]
    if options.measure != "always" and len(known) == len(keys):
        rate = mixture_rate([entry["samples_per_s_per_core"] for entry in known], [s.weight for s in cfg.data.sources])
        machines = sorted({entry.get("machine", "?") for entry in known})
        return {"rate": rate, "keys": keys, "source": f"{shown(path)} (benchmarks/loader.py on "
                f"{', '.join(machines)}; {'; '.join(entry.get('data', '?') for entry in known)})"}
    missing = [key for key in keys if key not in rates]
    why = "--measure-loader" if options.measure == "always" else \
        f"no rate for {', '.join(missing)} in {shown(path) if path else 'any rates file'}"
    if options.measure == "never":
        return {"rate": None, "keys": keys, "source": f"{why} (measure with --measure-loader)"}
    shards = ", ".join(s.shards for s in cfg.data.sources)
    try:
        rate = measure_rate(cfg, spec, options.seconds)
    except (OSError, ValueError) as exc:  # BadInputError is a ValueError: shards missing or unreadable here
        return {"rate": None, "keys": keys, "source": f"{why}, and measuring {shards} failed: {exc}"}
    return {"rate": rate, "keys": keys, "source": f"measured here ({why}): {options.seconds:g} s of {shards} through "
            "the loader in one process, one thread"}


def available_cores(profile) -> tuple:
    """(cores per GPU for the loader, the rule as words): a task's cores less the training process's."""
    if profile.scheduler == "slurm":
        task, where = profile.slurm.cpus_per_task, f"slurm.cpus_per_task={profile.slurm.cpus_per_task}"
    else:
        task = (os.cpu_count() or 1) // profile.processes_per_node
        where = f"{os.cpu_count()} cores here / {profile.processes_per_node} process(es)"
    return max(0, task - TRAINER_CORES), f"{where} less {TRAINER_CORES} for the training process"


def loader_estimate(cfg, profile, spec, flops_per_sample: float, options: Optional[LoaderOptions] = None) -> dict:
    """The plan's "loader" section: samples/s per GPU needed at ``options.mfu``, the per-core rate and its
    source, cores per GPU needed and available, and whether they suffice (None where a number is unknown)."""
    options = options or LoaderOptions()
    check_mfu(options.mfu)
    section = {"mfu": options.mfu, "gpu_peak_tflops": profile.gpu_peak_tflops, "flops_per_sample": flops_per_sample,
               "trainer_cores": TRAINER_CORES, "num_workers": cfg.data.num_workers}
    if not profile.gpu_peak_tflops or not flops_per_sample:
        return {**section, "needed_samples_per_s": None, "note": "the profile states no gpu_peak_tflops"}
    needed = options.mfu * profile.gpu_peak_tflops * 1e12 / flops_per_sample
    rate = per_core_rate(cfg, spec, options)
    available, rule = available_cores(profile)
    cores = needed / rate["rate"] if rate["rate"] else None
    return {**section, "needed_samples_per_s": needed, "rate_keys": rate["keys"],
            "per_core_samples_per_s": rate["rate"], "rate_source": rate["source"], "cores_needed": cores,
            "cores_available": available, "cores_rule": rule,
            "enough": None if cores is None else available >= cores}


def format_loader(section: dict) -> List[str]:
    """The plan's lines for the loader section."""
    head = f"  loader at MFU {section['mfu']:g}:"
    if section["needed_samples_per_s"] is None:
        return [f"{head} n/a ({section['note']})"]
    lines = [f"{head} {section['needed_samples_per_s']:.0f} samples/s per GPU needed "
             f"({section['gpu_peak_tflops']:g} TFLOP/s peak, {section['flops_per_sample'] / 1e9:.1f} GFLOP "
             "per training sample)"]
    rate = section["per_core_samples_per_s"]
    lines.append(f"    per-core loader rate ({', '.join(section['rate_keys'])}): "
                 + (f"{rate:.1f} samples/s, from {section['rate_source']}" if rate
                    else f"unknown ({section['rate_source']})"))
    needed = "n/a" if section["cores_needed"] is None else f"{section['cores_needed']:.1f}"
    lines.append(f"    CPU cores per GPU: {needed} needed, {section['cores_available']} available "
                 f"({section['cores_rule']}); data.num_workers={section['num_workers']}")
    if section["enough"] is False:
        lines.append(f"  WARNING: the loader needs {section['cores_needed']:.1f} cores per GPU for "
                     f"{section['needed_samples_per_s']:.0f} samples/s, {section['cores_available']} available: "
                     "the GPUs would wait for data; levers: " + "; ".join(LEVERS))
    return lines
