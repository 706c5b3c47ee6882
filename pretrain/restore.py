"""A trained objective rebuilt from a checkpoint folder: the trainable module's full fp32 weights merged from
whatever DeepSpeed wrote (ZeRO shards, the bf16 optimizer's partitions, a stage-0 module), assigned into an
objective built on meta parameters, and the objective's own state loaded.

Below the run config and the export: it takes a config already read (export reads it with the schema, a
distillation teacher as saved), so objectives that load a checkpoint of ours (a teacher) can use it.
"""
from __future__ import annotations

import glob
import logging
import os

import torch

from pretrain import checkpoint
from pretrain.export_hf import materialise, meta_parameters
from pretrain.objectives.base import build_objective

log = logging.getLogger(__name__)


def restore_objective(cfg, path: str):
    """The objective of run config ``cfg`` with the weights of checkpoint folder ``path``, built on meta
    parameters: the consolidated weights are assigned, never copied into a random initialisation, so the
    trainable module's weights are held once (:func:`meta_parameters`).

    Untrained modules (an EMA teacher) get their storage just before the objective loads its own state,
    which copies into them (an objective's ``load_state_dict`` is its own).
    """
    with meta_parameters():
        objective = build_objective(cfg)
    objective.trainable().load_state_dict(consolidated_state_dict(path), strict=True, assign=True)
    for module in objective.frozen():
        materialise(module)
    objective.load_state_dict(checkpoint.load_objective_state(path))
    return objective


def consolidated_state_dict(path: str) -> dict:
    """The full fp32 state dict of the trainable module saved at checkpoint folder ``path``.

    ZeRO (and bf16) checkpoints keep fp32 master weights in per-rank optimizer shards,
    which DeepSpeed's zero_to_fp32 merges; a plain stage-0 fp32 checkpoint holds the
    module itself. Every file is memory-mapped, so the Adam moments beside the master weights
    are never read; the pages of the weights read stay mapped (file-backed, reclaimable) until
    the merged tensors are made, so the peak is at most about twice the weights.
    """
    if glob.glob(os.path.join(path, "bf16_zero_pp_rank_*_optim_states.pt")):
        state = bf16_zero1_state_dict(path)
    elif glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt")):
        from pretrain.engine import consolidated_fp32_state

        state = consolidated_fp32_state(os.path.dirname(path), tag=os.path.basename(path))
    else:
        model_states = os.path.join(path, "mp_rank_00_model_states.pt")
        if not os.path.isfile(model_states):
            raise FileNotFoundError(f"{path}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        saved = torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)
        state = {**saved["module"], **stage0_master_weights(saved, checkpoint.trainer_state(path, 0))}
    return {name: tensor.float() for name, tensor in state.items()}


def bf16_zero1_state_dict(path: str) -> dict:
    """The fp32 master weights of a ZeRO-1 bf16 checkpoint with fp32 gradient accumulation (DeepSpeed's BF16
    optimizer, which zero_to_fp32 does not read), by parameter name; frozen parameters from the module.

    Each rank's file holds its flat fp32 partition of every parameter group and, per parameter, where
    its fragment lies in that partition (``param_slice_mappings``); a parameter's fragments in rank
    order make it whole.
    """
    model_states = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu", mmap=True,
                              weights_only=False)
    files = glob.glob(os.path.join(path, "bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    files.sort(key=lambda f: int(os.path.basename(f).split("_")[4]))  # bf16_zero_pp_rank_<R>_...
    pieces: dict = {}
    for file in files:
        saved = torch.load(file, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(saved["single_partition_of_fp32_groups"], saved["param_slice_mappings"]):
            for name, fragment in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    state = dict(model_states["module"])
    for group in model_states["param_shapes"]:
        for name, shape in group.items():
            state[name] = torch.cat(pieces[name]).view(shape)
    return state


def stage0_master_weights(model_states: dict, trainer_state: dict) -> dict:
    """The fp32 master weights of a ZeRO-0 bf16 checkpoint, by parameter name ({} for fp32 runs).

    DeepSpeed's ZeRO-0 bf16 optimizer steps fp32 copies of the bf16 module's parameters and saves
    them as ``fp32_groups`` in the order of the optimizer's parameter groups, whose names the
    trainer state records (``optimizer_param_names``). The bf16 module alone would round every
    weight to 8 mantissa bits.
    """
    groups = (model_states.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        return {}
    names = trainer_state.get("optimizer_param_names")
    if names is None or [len(g) for g in names] != [len(g) for g in groups]:
        log.warning("ZeRO-0 bf16 checkpoint without the names of its fp32 master weights (written before "
                    "trainer_state recorded optimizer_param_names): exporting the bf16-rounded module")
        return {}
    return {name: tensor for group_names, group in zip(names, groups) for name, tensor in zip(group_names, group)}
