"""One attention function with interchangeable kernels.

Backends:
    sdpa      torch.nn.functional.scaled_dot_product_attention (any device).
    xformers  xformers.ops.memory_efficient_attention (CUDA only).
    auto      xformers where it is installed and can run on the tensors' device, else sdpa.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
BACKENDS = ("auto", "sdpa", "xformers")
_announced: set = set()


def xformers_available() -> bool:
    """True when the xformers package is importable."""
    return importlib.util.find_spec("xformers") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete kernel for ``backend`` on ``device``.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: xformers requested where it is not installed or cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
    runs_here = device.type == "cuda" and xformers_available()
    if backend == "xformers" and not runs_here:
        why = "xformers is not installed (pip install '.[gpu]')" if not xformers_available() else (
            f"xformers kernels need a CUDA device, the model is on {device.type}"
        )
        raise RuntimeError(f"attention backend 'xformers' cannot run: {why}; use 'sdpa' or 'auto'")
    chosen = "xformers" if backend == "xformers" or (backend == "auto" and runs_here) else "sdpa"
    if backend == "auto" and (device.type, chosen) not in _announced:
        _announced.add((device.type, chosen))
        log.info("attention backend auto -> %s on %s", chosen, device.type)
    return chosen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Softmax attention.

    Args:
        q, k, v: [B, H, N, Dh].
        backend: auto | sdpa | xformers.

    Returns:
        [B, H, N, Dh].
    """
    if resolve_backend(backend, q.device) == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The math definition softmax(q k^T / sqrt(Dh)) v, for testing kernels. Shapes as attention()."""
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return weights.softmax(dim=-1) @ v
