"""Checkpoints: DeepSpeed shards + per-rank trainer state, a COMPLETE marker, an atomic latest pointer.

Layout under ``<run>/checkpoints``::

    step_000050/            DeepSpeed files (model, optimizer shards, lr schedule)
        trainer_state_rank{R}.pt   rank R's parts of the run state (pretrain/run_state.py): step, counters,
                                   RNG states, data-stream state, lineage, MLflow run id, optimizer names
        objective_state_rank{R}.pt  rank R's share of the objective's untrained state (EMA teacher, centres)
        config.yaml         the resolved run config
        COMPLETE            written last, after every rank finished: the step and every file's size and
                            CRC-32 (pretrain/integrity.py)
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
from typing import Optional

import torch

from pretrain import dist, integrity

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


def save(engine, ckpt_dir: str, step: int, state, config_yaml: str, keep_last: int) -> str:
    """Write a checkpoint of ``engine`` and ``state`` (the run's :class:`~pretrain.run_state.RunState`) on
    every rank, then mark it complete and point ``latest`` at it (rank 0).

    The objective state is the same on every rank (teachers are replicated): each rank writes a share
    of it. Collective: every rank must call it. Returns the checkpoint folder.
    """
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a killed run at the same step
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    os.makedirs(path, exist_ok=True)
    torch.save(state.rank_state(), os.path.join(path, f"trainer_state_rank{dist.rank()}.pt"))
    # the replicated objective state (an EMA teacher: 4.4 GB for ViT-g) is written in shares, one per rank,
    # so that no rank waits in the barrier while one writes all of it
    torch.save(objective_share(state.objective_state(), dist.rank(), dist.world_size()),
               os.path.join(path, f"objective_state_rank{dist.rank()}.pt"))
    if dist.is_main():
        with open(os.path.join(path, "config.yaml"), "w") as handle:
            handle.write(config_yaml)
    dist.barrier()
    # every rank checksums a share of the files just written (still in its page cache where it wrote them)
    shares = dist.all_gather_object(integrity.digests(path, dist.rank(), dist.world_size()))
    if dist.is_main():
        integrity.write_marker(path, step, {rel: digest for share in shares for rel, digest in share.items()})
        pointer = os.path.join(ckpt_dir, "latest")
        with open(pointer + ".tmp", "w") as handle:
            handle.write(tag)
        os.replace(pointer + ".tmp", pointer)
        # deleting old checkpoints can take minutes on a parallel file system: off the collective path
        threading.Thread(target=prune, args=(ckpt_dir, keep_last), name="prune-checkpoints").start()
    dist.barrier()
    return path


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


def trainer_state(path: str, rank: int) -> dict:
    """The trainer state rank ``rank`` saved in checkpoint folder ``path``."""
    return torch.load(os.path.join(path, f"trainer_state_rank{rank}.pt"), weights_only=False)


def trainer_states(path: str) -> list:
    """Every rank's trainer state in checkpoint folder ``path``, in rank order."""
    return [trainer_state(path, rank) for rank in range(saved_world(path))]


def load(engine, path: str, state) -> None:
    """Load checkpoint folder ``path``: DeepSpeed's state into ``engine``, the trainer and objective states
    into ``state`` (the run's :class:`~pretrain.run_state.RunState`, which reads the ranks' trainer states
    it needs: its own on the same layout)."""
    saved = saved_world(path)
    if not saved:
        raise FileNotFoundError(f"{path} holds no trainer_state_rank*.pt")
    if saved != dist.world_size() and engine.zero_optimization_stage() > 0:
        raise RuntimeError(
            f"{path} was written by {saved} process(es) with ZeRO-{engine.zero_optimization_stage()}: its "
            f"optimizer states are partitioned {saved} ways. Resume on {saved} processes, or from a "
            "checkpoint of a ZeRO-0 run"
        )
    loaded, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    state.load(saved, functools.partial(trainer_state, path), load_objective_state(path))
