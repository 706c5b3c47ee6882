"""Raw data → shards in parts: on every core, across a SLURM array, resumable and incremental.

A conversion first writes its **plan** (``OUT/.convert/plan.json``): the kind, the options, and the
sources found under SRC (sorted) cut into **parts** of ``sources_per_part`` sources (default: one
shard's worth for kinds with one sample per source, one slide for ``wsi``). Parts are independent:

- part ``P`` is written into ``OUT/.convert/part-PPPPPP/`` (its own shards ``0000.tar``...) and is
  finished when its record ``OUT/.convert/part-PPPPPP.json`` (shards, samples, skipped sources) is
  written, by a rename, after its shards are closed and synced. A part without a record is deleted
  and written again, so a converter killed at any point continues where it stopped and writes no
  sample twice;
- processes (``workers``) and SLURM array tasks (``task`` of ``tasks``: every ``tasks``-th part)
  take parts; the output does not depend on how many there were, because what goes into a part is
  fixed by the plan;
- the **merge** renames the parts' shards, in part order, to ``OUT/<modality>-NNNNNN.tar`` and writes
  ``manifest.json`` (it can be rerun: a shard already moved is kept).

Run again over the same OUT, a conversion keeps its plan and appends parts for the sources that are
new under SRC (new studies): only they are converted, and the shards already written keep their
names. Another kind or other options are refused unless ``fresh``, which starts over.
"""
from __future__ import annotations

import inspect
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Optional

from tqdm import tqdm

from data_pipeline.errors import BadInputError
from data_pipeline.kinds import KINDS
from data_pipeline.shards import FORMAT_VERSION, MANIFEST_NAME
from data_pipeline.tar_shards import ShardSequence

log = logging.getLogger(__name__)

WORK = ".convert"
PLAN = "plan.json"
PLAN_VERSION = 1


def available_cores() -> int:
    """The cores this process may run on (its affinity, which SLURM and taskset set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(kind: str, src: str, out: str, samples_per_shard: Optional[int] = None,
            sources_per_part: Optional[int] = None, workers: Optional[int] = None, progress: bool = True,
            fresh: bool = False, **options) -> dict:
    """Plan (or extend the plan of) a conversion of SRC into OUT, write its missing parts on ``workers``
    processes (default: the available cores) and merge. Returns the manifest written."""
    plan = prepare(kind, src, out, samples_per_shard, sources_per_part, fresh, options)
    run_parts(out, plan, workers, progress)
    return merge(out)


def prepare(kind: str, src: str, out: str, samples_per_shard: Optional[int], sources_per_part: Optional[int],
            fresh: bool, options: dict) -> dict:
    """The plan of OUT: made from SRC's listing, or the existing one with parts added for new sources.

    Raises:
        BadInputError: naming OUT when its plan was made with another kind or other options (without
            ``fresh``), or naming SRC when it is not a folder.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}; known: {sorted(KINDS)}")
    spec = KINDS[kind]
    per_shard = samples_per_shard or spec.samples_per_shard
    if per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {per_shard}")
    per_part = sources_per_part or (per_shard if spec.one_sample_per_source else 1)
    if per_part < 1:
        raise ValueError(f"sources_per_part must be at least 1, got {per_part}")
    wanted = {"kind": kind, "modality": spec.modality, "samples_per_shard": per_shard,
              "sources_per_part": per_part, "options": full_options(spec.sample_maker, options)}
    spec.sample_maker(**wanted["options"])  # bad options (an unknown encoding, a missing labels file) refused here
    listing = spec.sources(os.path.abspath(src)) if os.path.isdir(src) else spec.sources(src)
    os.makedirs(out, exist_ok=True)
    plan = None if fresh else load_plan(out, missing_ok=True)
    if plan is None:
        _start_over(out, spec.modality)
        plan = dict(wanted, version=PLAN_VERSION, source=src, src=os.path.abspath(src), parts=[])
    else:
        _check_same(out, plan, wanted)
    _add_new_sources(plan, listing, per_part)
    _write_json_atomically(os.path.join(out, WORK, PLAN), plan)
    return load_plan(out)  # as the workers and later runs see it (items through JSON)


def full_options(maker, given: dict) -> dict:
    """``given`` completed with the defaults of ``maker``'s keyword arguments (paths made absolute), so a
    rerun that spells a default out is the same conversion.

    Raises:
        ValueError: an option the kind does not take.
    """
    params = inspect.signature(maker).parameters
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"options {unknown} are not options of this kind (it takes {sorted(params)})")
    options = {name: given.get(name, param.default) for name, param in params.items()}
    for path in ("labels", "masks"):
        if options.get(path):
            options[path] = os.path.abspath(options[path])
    return options


def _check_same(out: str, plan: dict, wanted: dict) -> None:
    """Refuse other settings than the plan's; options the plan lacks (made before they existed) are taken at
    their defaults and written into it."""
    defaults = full_options(KINDS[plan["kind"]].sample_maker, {}) if plan.get("kind") in KINDS else {}
    plan["options"] = {**defaults, **plan.get("options", {})}
    changed = [f"{key}: {plan.get(key)!r} there, {value!r} now" for key, value in wanted.items()
               if plan.get(key) != value]
    if changed:
        raise BadInputError(out, "was converted with other settings (" + "; ".join(changed) + "); convert with "
                                 "the same ones to add new sources, or pass --fresh to start over")


def _add_new_sources(plan: dict, listing: list, per_part: int) -> None:
    """Append parts for the sources of ``listing`` that no part holds; log the planned ones that are gone."""
    known = {rel for part in plan["parts"] for rel, _ in part}
    new = [[rel, item] for rel, item in listing if rel not in known]
    gone = known - {rel for rel, _ in listing}
    if gone:
        log.warning("%d source(s) converted earlier are no longer under %s (their samples stay; --fresh rebuilds): "
                    "%s", len(gone), plan["src"], ", ".join(sorted(gone)[:5]))
    if new and plan["parts"]:
        log.info("%d new source(s) under %s: converting only them", len(new), plan["src"])
    plan["parts"].extend(new[start:start + per_part] for start in range(0, len(new), per_part))


def load_plan(out: str, missing_ok: bool = False) -> Optional[dict]:
    """The plan in ``OUT/.convert/plan.json`` (None when there is none and ``missing_ok``).

    Raises:
        BadInputError: naming the plan file when it is missing (unless ``missing_ok``) or unreadable.
    """
    path = os.path.join(out, WORK, PLAN)
    if not os.path.isfile(path):
        if missing_ok:
            return None
        raise BadInputError(path, "no conversion planned here; start one with `pretrain shards KIND SRC OUT`")
    try:
        with open(path, encoding="utf-8") as handle:
            plan = json.load(handle)
    except (OSError, ValueError) as exc:
        raise BadInputError(path, f"cannot read the conversion plan: {exc}") from exc
    if plan.get("version") != PLAN_VERSION:
        raise BadInputError(path, f"plan version {plan.get('version')!r} is not {PLAN_VERSION}; pass --fresh")
    return plan


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def part_record(out: str, index: int) -> Optional[dict]:
    """The record of a finished part, or None while it is not finished."""
    path = os.path.join(out, WORK, part_name(index) + ".json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def pending_parts(out: str, plan: dict, task: int = 0, tasks: int = 1) -> list:
    """Indices of this task's parts (every ``tasks``-th from ``task``) that have no record yet."""
    if not 0 <= task < tasks:
        raise ValueError(f"task {task} is not one of 0..{tasks - 1}")
    return [index for index in range(task, len(plan["parts"]), tasks) if part_record(out, index) is None]


def run_parts(out: str, plan: dict, workers: Optional[int] = None, progress: bool = True, task: int = 0,
              tasks: int = 1) -> int:
    """Write this task's unfinished parts on ``workers`` processes (1: in this process). Returns how many."""
    todo = pending_parts(out, plan, task, tasks)
    workers = max(1, min(workers or available_cores(), len(todo) or 1))
    jobs = [(os.path.abspath(out), plan, index) for index in todo]
    bar = tqdm(total=sum(len(plan["parts"][i]) for i in todo), desc=f"{plan['modality']} shards", unit="source",
               disable=not progress)
    with bar:
        if workers == 1:
            for job in jobs:
                bar.update(write_part(*job)["sources"])
            return len(todo)
        context = multiprocessing.get_context("spawn")  # no forked copies of the parent's threads or locks
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            running = {pool.submit(write_part, *job) for job in jobs[:2 * workers]}
            queued = iter(jobs[2 * workers:])
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    bar.update(future.result()["sources"])
                    running |= {pool.submit(write_part, *job) for job in [next(queued, None)] if job}
    return len(todo)


def write_part(out: str, plan: dict, index: int) -> dict:
    """Write part ``index`` of ``plan`` into its folder (anything half-written there is removed first), sync
    it, then its record; returns the record."""
    work = os.path.join(out, WORK)
    folder = os.path.join(work, part_name(index))
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    make_samples = KINDS[plan["kind"]].sample_maker(**plan["options"])
    counts, skipped = _write_samples(os.path.join(folder, "%04d.tar"), plan["modality"], plan["parts"][index],
                                     make_samples, plan["samples_per_shard"])
    for name in counts:
        with open(os.path.join(folder, name), "rb") as handle:
            os.fsync(handle.fileno())
    record = {"part": index, "sources": len(plan["parts"][index]), "skipped": skipped,
              "shards": [{"file": name, "samples": count} for name, count in counts.items()]}
    _write_json_atomically(os.path.join(work, part_name(index) + ".json"), record, sync=True)
    return record


def _write_samples(pattern: str, modality: str, items: list, make_samples, samples_per_shard: int) -> tuple:
    """Write the samples of every item into shards named by ``pattern``: ({shard file name: samples},
    [skipped items with their reasons])."""
    samples_in_shard: dict = {}
    skipped = []
    with ShardSequence(pattern, samples_per_shard) as writer:
        for rel, item in items:
            try:
                samples = list(make_samples(item, rel))
            except BadInputError as exc:
                skipped.append({"file": rel, "reason": exc.reason})
                tqdm.write(f"warning: skipped {rel}: {exc.reason}", file=sys.stderr)
                continue
            for key, sample in samples:
                writer.write({"__key__": key, **sample})
                shard_name = os.path.basename(writer.fname)
                samples_in_shard[shard_name] = samples_in_shard.get(shard_name, 0) + 1
    return samples_in_shard, skipped


def merge(out: str) -> dict:
    """Move every part's shards, in part order, to ``OUT/<modality>-NNNNNN.tar`` and write the manifest.

    Raises:
        BadInputError: naming OUT when parts are not finished (the conversion resumes if run again), or
            naming SRC when no source gave a sample.
    """
    plan = load_plan(out)
    records = [part_record(out, index) for index in range(len(plan["parts"]))]
    missing = [index for index, record in enumerate(records) if record is None]
    if missing:
        raise BadInputError(out, f"{len(missing)} of {len(records)} part(s) not converted yet (first: "
                                 f"{part_name(missing[0])}); run `pretrain shards resume {out}` to finish them")
    shards, skipped = [], []
    for record in records:
        skipped.extend(record["skipped"])
        for entry in record["shards"]:
            name = f"{plan['modality']}-{len(shards):06d}.tar"
            _move_once(os.path.join(out, WORK, part_name(record["part"]), entry["file"]), os.path.join(out, name))
            shards.append({"name": name, "samples": entry["samples"]})
        shutil.rmtree(os.path.join(out, WORK, part_name(record["part"])), ignore_errors=True)
    if not shards:
        raise BadInputError(plan["source"], f"no usable {plan['modality']} data found ({len(records)} part(s), "
                                            f"{len(skipped)} source(s) skipped)")
    manifest = {"modality": plan["modality"], "format_version": FORMAT_VERSION, "shards": shards,
                "total_samples": sum(entry["samples"] for entry in shards), "skipped": skipped,
                "source": plan["source"],
                "conversion": {key: plan[key] for key in ("kind", "samples_per_shard", "sources_per_part", "options")}
                | {"parts": len(records)}}
    _write_json_atomically(os.path.join(out, MANIFEST_NAME), manifest)
    return manifest


def _move_once(part_file: str, final: str) -> None:
    """Rename a part's shard to its final name; a rerun of the merge finds it there already."""
    if os.path.exists(part_file):
        os.replace(part_file, final)
    elif not os.path.exists(final):
        raise BadInputError(final, f"shard missing: neither it nor {part_file} exists; pass --fresh to convert again")


def _start_over(out: str, modality: str) -> None:
    """Delete what an earlier conversion left in OUT: its work folder, ``<modality>-NNNNNN.tar`` and the manifest."""
    shutil.rmtree(os.path.join(out, WORK), ignore_errors=True)
    earlier_shard = re.compile(rf"{re.escape(modality)}-\d{{6}}\.tar")
    for name in os.listdir(out):
        if earlier_shard.fullmatch(name) or name == MANIFEST_NAME:
            os.remove(os.path.join(out, name))


def _write_json_atomically(path: str, payload: dict, sync: bool = False) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp_path, path)
