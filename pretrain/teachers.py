"""Frozen teachers for distillation (``objective.distill.teacher``): any encoder we can read, rebuilt for the run.

A teacher is an export bundle or `pretrain import` folder, or a checkpoint of ours (a checkpoint folder, a
run folder or its ``latest`` pointer). Weights from elsewhere (official MAE / DINOv2 / DINOv3 ``.pth``, timm
/ transformers folders) become a teacher through `pretrain import SOURCE OUT`, whose parity check then
vouches for them, and ``OUT`` is named. It is rebuilt at the student's image size (a learned position table
resampled) with portable kernels (the distill objective gives it the run's backend, the trainer binds its
kernels), frozen: no gradients, eval mode, no drop path.

G2SD needs more than an encoder: its targets are a masked autoencoder's decoder features, so its teacher is
an MAE checkpoint of ours (:func:`mae_teacher`). DINO targets come from a DINOv2 run's heads, so that teacher
is a DINOv2 checkpoint of ours, its EMA teacher (backbone and heads, :func:`dino_teacher`).

The teacher's weights are not written into the student's checkpoints (a ViT-g teacher would be most of each
one); a checkpoint records the teacher's :func:`fingerprint` instead, and a resume refuses a teacher that
changed since. Where the objective is built for its shapes only (export, the planner: on 'meta'), the teacher
is built from its settings alone and holds no weights (:func:`on_meta`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from typing import Optional, Tuple

import torch
from torch import nn

from data_pipeline.errors import BadInputError
from pretrain import checkpoint
from pretrain.bundles import BUNDLE_CONFIG, BUNDLE_WEIGHTS, build_encoder, encoder_fields, load_weights, read_bundle
from pretrain.errors import ConfigError
from pretrain.models.blocks import Attention, SwiGLU
from pretrain.models.vit import VisionTransformer

KEY = "objective.distill.teacher"
log = logging.getLogger(__name__)


def _is_checkpoint(path: str) -> bool:
    """A checkpoint folder, a run folder, its checkpoints folder or ``latest`` pointer."""
    return os.path.isfile(os.path.join(path, "config.yaml")) or os.path.isdir(os.path.join(path, "checkpoints")) \
        or os.path.basename(path) in ("latest", "checkpoints")


def _run_config(path: str) -> tuple:
    """(checkpoint folder, its run config as saved, with portable kernels) of the checkpoint ``path`` names."""
    from omegaconf import OmegaConf

    from pretrain.kernels import portable

    try:
        folder = checkpoint.resolve(path)
    except (FileNotFoundError, ValueError) as exc:
        raise BadInputError(path, f"not a readable checkpoint of ours for {KEY}: {exc}") from exc
    cfg = OmegaConf.load(os.path.join(folder, "config.yaml"))
    portable(cfg.model)
    return folder, cfg


def _trained_objective(path: str) -> tuple:
    """(run config, objective with its trained weights) of the newest complete checkpoint ``path`` names."""
    from pretrain.restore import restore_objective

    folder, cfg = _run_config(path)
    return cfg, restore_objective(cfg, folder)


def on_meta() -> bool:
    """Whether modules are being built for their shapes only (export's meta parameters, the planner's meta
    device): a teacher is then built without reading its weights."""
    from pretrain.export_hf import building_on_meta

    return building_on_meta() or torch.empty(0).is_meta


def _checkpoint_shape(path: str) -> tuple:
    """(run config, objective) of the checkpoint ``path`` names, on meta parameters (no weights read)."""
    from pretrain.export_hf import meta_parameters
    from pretrain.objectives.base import build_objective

    _, cfg = _run_config(path)
    with meta_parameters():
        return cfg, build_objective(cfg)


def encoder_state(path: str, key: str = KEY) -> Tuple[dict, dict]:
    """(``model.*`` settings, encoder state dict) of the teacher at ``path`` (named by the setting ``key``).

    Raises:
        BadInputError: nothing there, or nothing we read as a ViT encoder (naming the path).
    """
    if not os.path.exists(path):
        raise BadInputError(path, f"{key}: no such file or folder")
    if all(os.path.isfile(os.path.join(path, name)) for name in (BUNDLE_CONFIG, BUNDLE_WEIGHTS)):
        return read_bundle(path)
    if _is_checkpoint(path):
        cfg, objective = _trained_objective(path)
        encoder = objective.encoder()
        return encoder_fields(encoder, cfg.model.size), encoder.state_dict()
    raise BadInputError(path, f"{key}: neither an export bundle or import folder ({BUNDLE_CONFIG} + "
                              f"{BUNDLE_WEIGHTS}) nor a checkpoint of ours; import other weights first "
                              "(`pretrain import SOURCE OUT`) and name OUT")


_shared: Optional[dict] = None
"""While :func:`sharing`: the teachers built so far, by builder and arguments."""


@contextlib.contextmanager
def sharing():
    """Teachers built inside are built once per builder and arguments and shared (several students of one
    job distil the same teacher: one copy in memory, its weights read once)."""
    global _shared
    outer, _shared = _shared, {} if _shared is None else _shared
    try:
        yield
    finally:
        _shared = outer


def _shareable(build):
    """A teacher builder that returns the copy already built inside :func:`sharing`."""

    @functools.wraps(build)
    def shared(*args):
        if _shared is None:
            return build(*args)
        key = (build.__name__, *args)
        if key not in _shared:
            _shared[key] = build(*args)
        return _shared[key]

    return shared


@_shareable
def encoder_teacher(path: str, img_size: int, key: str = KEY) -> VisionTransformer:
    """The teacher encoder at ``path``, rebuilt for ``img_size`` pixels and frozen (its shape only
    where :func:`on_meta`); errors name the setting ``key``.

    Raises:
        ConfigError: ``img_size`` is not a whole number of the teacher's patches.
    """
    if on_meta() and os.path.exists(path) and _is_checkpoint(path):
        cfg, objective = _checkpoint_shape(path)
        fields, state = encoder_fields(objective.encoder(), cfg.model.size), None
    else:
        fields, state = encoder_state(path, key)
    if img_size % fields["patch_size"]:
        raise ConfigError(f"{key}={path}: model.img_size={img_size} is not a multiple of the teacher's patch size "
                          f"{fields['patch_size']}")
    encoder = build_encoder({**fields, "img_size": img_size})
    if state is not None and not on_meta():
        load_weights([encoder], fields, state, path, key=key)
    return freeze(encoder)


@_shareable
def mae_teacher(path: str) -> nn.Module:
    """The masked autoencoder (encoder and decoder) of the MAE checkpoint at ``path``, frozen (its shape
    only where :func:`on_meta`).

    Raises:
        BadInputError: ``path`` is not a checkpoint of ours, or one of another objective.
    """
    return freeze(_objective_of(path, "mae", "an MAE", "G2SD distils an MAE decoder's features").trainable())


@_shareable
def dino_teacher(path: str) -> nn.Module:
    """The EMA teacher (backbone, DINO head, iBOT head) of the DINOv2 checkpoint at ``path``, frozen (its shape
    only where :func:`on_meta`).

    Raises:
        BadInputError: ``path`` is not a checkpoint of ours, or one of another objective.
    """
    return freeze(_objective_of(path, "dinov2", "a DINOv2", "the dino loss distils a DINOv2 run's heads").teacher)


def _objective_of(path: str, name: str, label: str, why: str):
    """The trained objective (its shapes only where :func:`on_meta`) of the checkpoint at ``path``, which must
    be one of objective ``name`` (``label`` in messages, with its article; ``why`` the reason)."""
    if not (os.path.exists(path) and _is_checkpoint(path)):
        raise BadInputError(path, f"{KEY}: {why}, so its teacher must be {label} checkpoint of ours (a run folder "
                                  "or checkpoint folder); export bundles and imports hold the encoder only")
    cfg, objective = _checkpoint_shape(path) if on_meta() else _trained_objective(path)
    if cfg.objective.name != name:
        raise BadInputError(path, f"{KEY}: a {cfg.objective.name} checkpoint; {why}, so it needs {label} one")
    return objective


def freeze(module: nn.Module) -> nn.Module:
    """``module`` without gradients, in eval mode, drop path off."""
    module.requires_grad_(False)
    module.eval()
    for part in module.modules():
        if hasattr(part, "drop_path") and hasattr(part.drop_path, "p"):
            part.drop_path.p = 0.0
    return module


PARTITION_SHARE = 0.1
"""``teacher_placement: auto`` partitions a teacher whose replicated fp32 copy would take more than this share of
a GPU's memory (a ViT-g's 4.5 GB on an 80 GB GPU stays replicated; a 7B teacher's 28 GB is partitioned)."""


def partitioned(teacher: nn.Module, placement: str, gpu_bytes: float) -> list:
    """[teacher] where it is to be partitioned over the ranks by ZeRO-3 (``placement`` partitioned, or auto
    and too large for every GPU to hold; ``gpu_bytes`` 0: no GPU, nothing to save), else []."""
    if placement == "auto":
        replicated = 4 * sum(p.numel() for p in teacher.parameters())
        placement = "partitioned" if gpu_bytes > 0 and replicated > PARTITION_SHARE * gpu_bytes else "replicated"
    return [teacher] if placement == "partitioned" else []


class FrozenTeacherMixin:
    """What a distillation objective with a frozen teacher provides alike: ``self.student`` is trained,
    ``self.teacher`` frozen and moved to the device, the checkpoint holds ``self.fingerprint`` and a resume
    with another teacher (``self.d.teacher``) is refused."""

    def trainable(self) -> nn.Module:
        return self.student

    def frozen(self) -> list:
        return [self.teacher]

    def models(self) -> list:
        return [self.student, self.teacher]

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)

    def frozen_partitioned(self, gpu_bytes: float) -> list:
        return partitioned(self.teacher, self.d.teacher_placement, gpu_bytes)

    def teacher_encoder(self) -> nn.Module:
        """The teacher's encoder (an MAE teacher's, for G2SD)."""
        return self.teacher if isinstance(self.teacher, VisionTransformer) else self.teacher.encoder

    def state_dict(self) -> dict:
        return {"teacher_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Refuse to resume with a teacher whose weights changed (where the teacher was loaded)."""
        check_fingerprint(state.get("teacher_fingerprint", ""), self.fingerprint, self.d.teacher)


def partition_frozen(objective, cfg, world: int, device: torch.device) -> list:
    """Partition the frozen modules ``objective`` asks for (a large distillation teacher) over the ``world``
    ranks: one DeepSpeed engine without an optimizer each (ZeRO-3; its hooks gather each block in the passes).
    Returns the engines."""
    from pretrain.engine import build_engine, frozen_config

    gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    engines = []
    for module in objective.frozen_partitioned(gpu):
        whole = sum(p.numel() for p in module.parameters())
        engines.append(build_engine(module, None, None, frozen_config(cfg, world), cfg.distributed.timeout_minutes))
        mine = sum(getattr(p, "ds_tensor", p).numel() for p in module.parameters())
        log.info("frozen %s partitioned over %d rank(s) (ZeRO-3): %d of its %d parameters on this rank",
                 type(module).__name__, world, mine, whole)
    return engines


def run_backends(teacher: nn.Module, backend: str) -> None:
    """Give the teacher's attention and SwiGLU layers the run's backend (``model.attn_backend``), which the
    trainer's kernel binding resolves for the device: a teacher is built with portable ones."""
    for layer in teacher.modules():
        if isinstance(layer, (Attention, SwiGLU)):
            layer.backend = backend


def check_fingerprint(saved: str, current: str, path: str) -> None:
    """Refuse to resume with a teacher whose weights changed: ``saved`` is the checkpoint's fingerprint,
    ``current`` the loaded teacher's ('' where it was not loaded, which checks nothing)."""
    if current and saved and saved != current:
        raise ConfigError(f"{KEY}={path}: its weights are not those this run was trained with (fingerprint "
                          f"{current[:12]}, checkpoint {saved[:12]}); resume with the original teacher, or start a "
                          "new run")


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of ``module``'s parameters (what a resume compares)."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
