"""Fused kernels from NVIDIA apex where it is installed, PyTorch's own otherwise.

apex is not on PyPI: clusters build it from source against their CUDA. Two settings pick:

    model.norm_impl   auto | torch | apex   apex.normalization.FusedLayerNorm, or torch.nn.LayerNorm
    optim.impl        auto | torch | apex   apex.optimizers.FusedAdam (AdamW mode) / FusedLAMB, or
                                            torch.optim.AdamW with its fused kernel

``auto`` takes apex when it imports and a CUDA device is present, PyTorch otherwise; asking
for ``apex`` where it cannot run is an error that says how to install it. Both choices are
logged once per process. For the LayerNorm this module only decides: the model builds the one it
is told (:func:`pretrain.models.norm.layer_norm`, given :func:`resolve_impl`'s answer by
:mod:`pretrain.backbone`); the optimizer it also builds (:func:`fused_optimizer`). apex's modules keep
PyTorch's parameter names (``weight``, ``bias``), so checkpoints and exports do not depend on the choice.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from pretrain.errors import ConfigError

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "apex")
APEX_INSTALL = ("NVIDIA apex is not on PyPI; build it on a GPU node: pip install -v --no-build-isolation "
                "--config-settings '--build-option=--cpp_ext' --config-settings '--build-option=--cuda_ext' "
                "git+https://github.com/NVIDIA/apex")
_announced: set = set()


APEX_EXTENSIONS = ("fused_layer_norm_cuda", "amp_C")
"""apex's compiled CUDA extensions behind FusedLayerNorm and FusedAdam / FusedLAMB: a Python-only apex
install (no ``--cuda_ext``) imports fine and fails on the first fused call."""


def apex_runs() -> tuple:
    """(True, '') when apex and its CUDA extensions import and a CUDA device is present; (False, why) otherwise."""
    if importlib.util.find_spec("apex") is None:
        return False, "apex is not installed"
    if not torch.cuda.is_available():
        return False, "apex's fused kernels need a CUDA device and there is none"
    for extension in APEX_EXTENSIONS:
        try:
            importlib.import_module(extension)
        except ImportError as error:
            return False, f"apex is installed without its CUDA extension {extension} ({error}): rebuild it with --cuda_ext"
    return True, ""


def resolve_impl(setting: str, requested: str) -> str:
    """'apex' or 'torch' for ``requested`` (auto | torch | apex) of the setting named ``setting``.

    Raises:
        ValueError: an unknown implementation name.
        ConfigError: apex requested where it cannot run, with the install hint.
    """
    if requested not in IMPLS:
        raise ValueError(f"{setting}={requested!r} is not one of {list(IMPLS)}")
    runs, why = apex_runs()
    if requested == "apex" and not runs:
        raise ConfigError(f"{setting}=apex: {why}. {APEX_INSTALL}; or set {setting}=torch (or auto)")
    return "apex" if requested == "apex" or (requested == "auto" and runs) else "torch"


def optimizer_impl(requested: str, name: str, offload: bool) -> str:
    """'apex' or 'torch' for ``optim.impl=requested``; with the optimizer offloaded to the CPU (DeepSpeed
    steps the fp32 partition there) never apex, whose fused optimizers run on CUDA tensors only.

    Raises:
        ConfigError: apex or LAMB requested with optimizer offload.
    """
    if offload and (requested == "apex" or name == "lamb"):
        raise ConfigError(f"optim.impl={requested} optim.name={name} with distributed.offload_optimizer: the "
                          "optimizer then steps on the CPU, where apex's fused kernels cannot run; use "
                          "optim.impl=torch (or auto) with optim.name=adamw")
    return "torch" if offload else resolve_impl("optim.impl", requested)


def announce(what: str, choice: str) -> None:
    """Log the kernel chosen for ``what`` once per process."""
    if (what, choice) not in _announced:
        _announced.add((what, choice))
        log.info("%s: %s", what, choice)


def fused_optimizer(groups: list, lr: float, betas: tuple, name: str, impl: str) -> torch.optim.Optimizer:
    """The optimizer ``name`` (adamw | lamb) over parameter ``groups`` with the resolved ``impl``.

    PyTorch's AdamW runs its fused kernel (CUDA and CPU); PyTorch has no LAMB.

    Raises:
        ConfigError: lamb without apex.
    """
    if impl == "apex":
        from apex.optimizers import FusedAdam, FusedLAMB

        optimizer = (FusedLAMB(groups, lr=lr, betas=betas) if name == "lamb"
                     else FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True))
        announce("optimizer", f"apex {type(optimizer).__name__}")
        return optimizer
    if name == "lamb":
        raise ConfigError(f"optim.name=lamb needs apex's FusedLAMB (PyTorch has no LAMB): {APEX_INSTALL}")
    announce("optimizer", "torch AdamW (fused kernel)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def portable(model_cfg) -> None:
    """Set ``model_cfg`` (a ModelConfig) to kernels every machine runs, in place: PyTorch LayerNorm,
    attention ``auto``, no compilation. For rebuilding a model away from its training cluster
    (export, the planner on a login node): the choice never changes parameters or their names."""
    model_cfg.norm_impl = "torch"
    model_cfg.attn_backend = "auto"
    model_cfg.compile = False
