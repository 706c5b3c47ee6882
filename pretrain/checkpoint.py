"""Checkpoints: DeepSpeed shards + per-rank trainer state, a COMPLETE marker, an atomic latest pointer.

Layout under ``<run>/checkpoints``::

    step_000050/            DeepSpeed files (model, optimizer shards, lr schedule)
        trainer_state_rank{R}.pt   rank R's parts of the run state (pretrain/run_state.py): step, counters,
                                   RNG states, data-stream state, lineage, MLflow run id, optimizer names
        objective_state_rank{R}.pt  rank R's share of the objective's untrained state (EMA teacher, centres)
        config.yaml         the resolved run config
        COMPLETE            written last, after every rank finished: the step and every file's size and
                            CRC-32 (pretrain/integrity.py)
        COMPLETE.rank{R}    while the checkpoint is written: rank R's report of the files it wrote
        universal/          only once resumed on another process count under ZeRO 1-3 (or after
                            `pretrain checkpoint convert`): DeepSpeed's universal checkpoint of the same
                            step, with a COMPLETE marker of its own (a folder without one is redone)
    latest                  name of the newest complete checkpoint (replaced atomically)

Resuming and exporting take the newest complete checkpoint that verifies against its marker (sizes;
checksums on request) and log why newer ones were passed over.
"""
from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shutil
import threading
import time
from typing import Optional

import torch
from omegaconf import OmegaConf

from pretrain import dist, integrity
from pretrain.engine import load_universal, to_universal

log = logging.getLogger(__name__)
TAG = re.compile(r"^step_(\d{6,})$")


def tag_for(step: int) -> str:
    """Checkpoint folder name for a step."""
    return f"step_{step:06d}"


def is_complete(path: str) -> bool:
    """True when every rank finished writing the checkpoint at ``path``."""
    return os.path.isfile(os.path.join(path, integrity.MARKER))


def completed_step(path: str) -> int:
    """The step a complete checkpoint folder holds (from its marker)."""
    return integrity.read_marker(path)["step"]


def complete_checkpoints(ckpt_dir: str) -> list:
    """Complete checkpoint folders under ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = sorted((int(m.group(1)), name) for name in os.listdir(ckpt_dir) if (m := TAG.match(name)))
    return [os.path.join(ckpt_dir, name) for _, name in tags if is_complete(os.path.join(ckpt_dir, name))]


def find_latest(ckpt_dir: str, checksums: bool = False) -> Optional[str]:
    """The newest complete checkpoint that verifies (:func:`pretrain.integrity.damage`; file sizes, and
    CRC-32s with ``checksums``); each newer one passed over is logged with what is wrong with it."""
    for path in reversed(complete_checkpoints(ckpt_dir)):
        wrong = integrity.damage(path, checksums)
        if wrong is None:
            return path
        log.warning("passing over checkpoint %s: %s", path, wrong)
    return None


def resolve(path: str, checksums: bool = False) -> str:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder, its ``latest`` file or a run
    folder: the one named, or the newest there that verifies (see :func:`find_latest`).

    Raises:
        FileNotFoundError: nothing complete (and intact) there.
        ValueError: the checkpoint folder named is damaged (what is wrong with it).
    """
    if os.path.basename(path.rstrip("/")) == "latest" and os.path.isfile(path):
        path = os.path.dirname(path)
    if is_complete(path):
        wrong = integrity.damage(path, checksums)
        if wrong:
            raise ValueError(f"checkpoint {path} is damaged: {wrong}; name an earlier one or the run folder")
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(candidate) and (latest := find_latest(candidate, checksums)):
            return latest
    raise FileNotFoundError(f"{path}: no complete, intact checkpoint (a COMPLETE marker is written last)")


OBJECTIVE_STATE = "objective_state.pt"


def save(engine, ckpt_dir: str, step: int, state, config_yaml: str, keep_last: int, writer,
         timeout_s: float, students=()) -> str:
    """Write a checkpoint of ``engine`` and ``state`` (the run's :class:`~pretrain.run_state.RunState`)
    through every rank's ``writer`` (:class:`~pretrain.checkpoint_writer.CheckpointWriter`: in place, or
    from a host copy in the background); rank 0 marks it complete once every rank has reported its files
    (waiting ``timeout_s`` at most) and points ``latest`` at it.

    The objective state is the same on every rank (teachers are replicated): each rank writes a share
    of it. Collective: every rank must call it. Returns the checkpoint folder, complete when this returns
    unless the writer works in the background. ``students``: the distillation students this rank trains
    (:class:`pretrain.students.Unit`, each writing its own sub-folder), where ``engine`` is None.
    """
    writer.wait()  # the checkpoint before, if it is still being written: one at a time
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a killed run at the same step
    dist.barrier()
    writer.begin(path, step)
    if engine is not None:  # through the writer (engine.route_checkpoint_files)
        engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    os.makedirs(path, exist_ok=True)
    for student in students:
        student.save(path, step, writer)
    writer.put(os.path.join(path, f"trainer_state_rank{dist.rank()}.pt"), state.rank_state())
    # the replicated objective state (an EMA teacher: 4.4 GB for ViT-g) is written in shares, one per rank,
    # so that no rank waits while one writes all of it
    writer.put(os.path.join(path, f"objective_state_rank{dist.rank()}.pt"),
               objective_share(state.objective_state(), dist.rank(), dist.world_size()))
    commit = None
    if dist.is_main():
        with open(os.path.join(path, "config.yaml"), "w") as handle:
            handle.write(config_yaml)
        commit = functools.partial(_commit, ckpt_dir, path, step, dist.world_size(), keep_last, timeout_s)
    writer.finish(commit)
    if not writer.background:
        dist.barrier()
    return path


def _commit(ckpt_dir: str, path: str, step: int, world: int, keep_last: int, timeout_s: float) -> None:
    """Rank 0, once every rank reported the files it wrote of checkpoint ``path`` (sizes and CRC-32s, taken
    as each was written): the COMPLETE marker listing them all, then ``latest``, then pruning."""
    files = integrity.await_reports(path, world, timeout_s)
    for rel in integrity.listing(path):  # written beside the writers: config.yaml, DeepSpeed's recovery script
        if rel not in files:
            files[rel] = integrity.digest(os.path.join(path, rel))
    integrity.write_marker(path, step, files)
    integrity.remove_reports(path, world)
    pointer = os.path.join(ckpt_dir, "latest")
    with open(pointer + ".tmp", "w") as handle:
        handle.write(os.path.basename(path))
    os.replace(pointer + ".tmp", pointer)
    # deleting old checkpoints can take minutes on a parallel file system: off the run's path
    threading.Thread(target=prune, args=(ckpt_dir, keep_last), name="prune-checkpoints").start()


def _flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def objective_share(state: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a replicated objective state: every ``world``-th entry of its flattened
    items ({'a/b': value}), so the ranks write it in parallel."""
    return {key: value for index, (key, value) in enumerate(sorted(_flat(state).items())) if index % world == rank}


def merge_shares(shares: list) -> dict:
    """The nested objective state back from its shares."""
    state: dict = {}
    for share in shares:
        for key, value in share.items():
            node = state
            *parents, leaf = key.split("/")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return state


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` and incomplete ones older than them."""
    complete = complete_checkpoints(ckpt_dir)
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    newest = complete[-1] if complete else None
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if not TAG.match(name) or path in keep:
            continue
        if is_complete(path) or (newest and name < os.path.basename(newest)):
            shutil.rmtree(path, ignore_errors=True)


def load_objective_state(path: str) -> dict:
    """The objective state saved in checkpoint folder ``path`` (on the CPU): its per-rank shares merged, or
    the single file of checkpoints written before the shares."""
    shares = sorted(glob.glob(os.path.join(path, "objective_state_rank*.pt")))
    if not shares:
        return torch.load(os.path.join(path, OBJECTIVE_STATE), map_location="cpu", weights_only=False)
    return merge_shares([torch.load(f, map_location="cpu", weights_only=False) for f in shares])


def saved_world(path: str) -> int:
    """How many processes wrote checkpoint folder ``path`` (its ``trainer_state_rank*.pt`` files)."""
    return len(glob.glob(os.path.join(path, "trainer_state_rank*.pt")))


def saved_global_batch(path: str) -> int:
    """Samples per optimizer step of the run that wrote checkpoint folder ``path`` (its config and ranks)."""
    saved = OmegaConf.load(os.path.join(path, "config.yaml"))
    return saved.data.batch_size * saved.distributed.grad_accum * saved_world(path)


def trainer_state(path: str, rank: int) -> dict:
    """The trainer state rank ``rank`` saved in checkpoint folder ``path``."""
    return torch.load(os.path.join(path, f"trainer_state_rank{rank}.pt"), weights_only=False)


def trainer_states(path: str) -> list:
    """Every rank's trainer state in checkpoint folder ``path``, in rank order."""
    return [trainer_state(path, rank) for rank in range(saved_world(path))]


UNIVERSAL = "universal"
"""The sub-folder of a checkpoint that holds its universal conversion."""


def partitioned(path: str) -> bool:
    """Whether checkpoint folder ``path`` holds ZeRO-partitioned optimizer states (stages 1-3)."""
    return bool(glob.glob(os.path.join(path, "*optim_states.pt")))


def needs_universal(path: str, world: int) -> bool:
    """Whether resuming checkpoint folder ``path`` on ``world`` processes goes through its universal
    conversion: its optimizer states are partitioned for another process count. (ZeRO-0 checkpoints hold
    the whole optimizer state and load on any count as they are.)"""
    return saved_world(path) != world and partitioned(path)


def convert(path: str, workers: int = 1) -> str:
    """The universal checkpoint of ZeRO checkpoint folder ``path`` at ``path/universal``: converted once,
    kept (its own COMPLETE marker, written last, says so), redone where a conversion was cut short.
    Needs no process group. Returns the universal folder.

    Raises:
        ValueError: ``path`` is a ZeRO-0 checkpoint (nothing to convert: it resumes on any process count).
    """
    folder = os.path.join(path, UNIVERSAL)
    if is_complete(folder) and integrity.damage(folder) is None:
        log.info("%s: converted already", folder)
        return folder
    if not partitioned(path):
        raise ValueError(f"{path} holds no ZeRO-partitioned optimizer states (a ZeRO-0 run): it resumes on any "
                         "process count as it is")
    if os.path.isdir(folder):
        # a leftover of a killed conversion; DeepSpeed also walks the checkpoint folder recursively, so a
        # leftover's model-state files would be counted as the checkpoint's own
        shutil.rmtree(folder)
    start = time.perf_counter()
    to_universal(path, folder, workers)
    pointer = os.path.join(path, "latest_universal")  # DeepSpeed's pointer: we name the folder ourselves
    if os.path.isfile(pointer):
        os.remove(pointer)
    files = integrity.digests(folder)
    integrity.write_marker(folder, completed_step(path), files)
    log.info("converted %s to a universal checkpoint in %.1f s (%.2f GB)", path, time.perf_counter() - start,
             sum(entry["size"] for entry in files.values()) / 1e9)
    return folder


def _load_deepspeed(engine, path: str) -> None:
    """DeepSpeed's state of checkpoint folder ``path`` into ``engine``: the checkpoint itself, or (ZeRO 1-3
    on another process count) its universal conversion, made by rank 0 while the others wait."""
    if not needs_universal(path, dist.world_size()):
        loaded, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        return
    failure = None
    if dist.is_main():
        log.warning("%s was written by %d process(es) with ZeRO-partitioned optimizer states: resuming on %d "
                    "through its universal checkpoint", path, saved_world(path), dist.world_size())
        try:
            convert(path)
        except Exception as exc:  # told to every rank: the others would wait for the conversion otherwise
            log.exception("converting %s to a universal checkpoint failed", path)
            failure = f"{type(exc).__name__}: {exc}"
    failure = dist.broadcast_object(failure)
    if failure is not None:
        raise RuntimeError(f"could not convert {path} to a universal checkpoint: {failure}")
    load_universal(engine, path, UNIVERSAL)


def load(engine, path: str, state, students=()) -> None:
    """Load checkpoint folder ``path``: DeepSpeed's state into ``engine``, the trainer and objective states
    into ``state`` (the run's :class:`~pretrain.run_state.RunState`, which reads the ranks' trainer states
    it needs: its own on the same layout, every rank's on another); each of ``students`` (where ``engine``
    is None) loads its own sub-folder."""
    saved = saved_world(path)
    if not saved:
        raise FileNotFoundError(f"{path} holds no trainer_state_rank*.pt")
    if engine is not None:
        _load_deepspeed(engine, path)
    state.load(saved, functools.partial(trainer_state, path), load_objective_state(path))
    for student in students:
        student.load(path)
