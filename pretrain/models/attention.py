"""One attention function with interchangeable kernels.

Backends:
    sdpa      torch.nn.functional.scaled_dot_product_attention (any device).
    xformers  xformers.ops.memory_efficient_attention (CUDA only).
    auto      xformers where it is installed and can run on the tensors' device, else sdpa.

Sequences of different lengths can be packed into one batch row and attend only within
themselves (:class:`BlockDiagonal`): xformers' ``BlockDiagonalMask`` runs that without
padding or a dense mask; sdpa gets the equivalent dense boolean mask (for testing packing).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
BACKENDS = ("auto", "sdpa", "xformers")
_announced: set = set()


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """True when the xformers package is importable (looked up once: attention asks on every forward)."""
    return importlib.util.find_spec("xformers") is not None


def resolve_backend(backend: str, device: torch.device, announce: bool = True) -> str:
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
    if announce and backend == "auto" and (device.type, chosen) not in _announced:
        _announced.add((device.type, chosen))
        log.info("attention backend auto -> %s on %s", chosen, device.type)
    return chosen


class BlockDiagonal:
    """Sequences of ``seqlens`` tokens packed one after another along the token axis of a batch of one;
    each token attends only to the tokens of its own sequence."""

    def __init__(self, seqlens: Sequence[int]):
        self.seqlens = [int(n) for n in seqlens]
        self._xformers = None

    def sequence_ids(self, device: torch.device) -> torch.Tensor:
        """[N] the sequence each packed token belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.seqlens), device=device),
                                       torch.tensor(self.seqlens, device=device))

    def dense(self, device: torch.device) -> torch.Tensor:
        """[N, N] bool mask, True where attention is allowed."""
        ids = self.sequence_ids(device)
        return ids[:, None] == ids[None, :]

    def xformers(self):
        """xformers' ``BlockDiagonalMask`` for these lengths (made once)."""
        if self._xformers is None:
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            self._xformers = BlockDiagonalMask.from_seqlens(self.seqlens)
        return self._xformers


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              packed: Optional[BlockDiagonal] = None) -> torch.Tensor:
    """Softmax attention.

    Args:
        q, k, v: [B, H, N, Dh] (B = 1 with ``packed``).
        backend: auto | sdpa | xformers.
        packed: the packed sequences' lengths (attention stays within each).

    Returns:
        [B, H, N, Dh].
    """
    if resolve_backend(backend, q.device) == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=packed.xformers() if packed is not None else None)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=packed.dense(q.device) if packed is not None else None)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The math definition softmax(q k^T / sqrt(Dh)) v, for testing kernels. Shapes as attention();
    ``allowed``: an optional [N, N] bool mask."""
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if allowed is not None:
        weights = weights.masked_fill(~allowed, float("-inf"))
    return weights.softmax(dim=-1) @ v
