"""One attention function with interchangeable kernels.

Backends:
    sdpa      torch.nn.functional.scaled_dot_product_attention (any device).
    xformers  xformers.ops.memory_efficient_attention (CUDA only).
    auto      xformers where it is installed and can run on the tensors' device, else sdpa.

A model's layers hold a concrete kernel (:data:`DEFAULT_KERNEL` until the builder binds the one chosen
by :func:`choose_kernel` for the device and dtype the model runs in, :func:`pretrain.backbone.bind_kernels`)
and call :func:`run_kernel`: nothing is decided in a forward. :func:`attention` resolves the backend on
every call, for standalone use and tests.

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
DEFAULT_KERNEL = "sdpa"
"""The kernel a layer runs until one is bound: PyTorch's, on every device."""
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


@functools.lru_cache(maxsize=None)
def xformers_refusal(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Why xformers' memory-efficient attention has no operator for [*, *, *, head_dim] ``dtype`` inputs on
    ``device`` ('' when one runs): tried once with a tiny call."""
    import xformers.ops as xops

    q = torch.zeros(1, 8, 1, head_dim, device=device, dtype=dtype)
    try:
        xops.memory_efficient_attention(q, q, q)
    except (NotImplementedError, ValueError, RuntimeError) as error:
        return str(error).strip().splitlines()[0]
    return ""


def choose_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel attention of ``head_dim`` in ``dtype`` on ``device`` runs with, decided once when the model
    is bound for its device: :func:`resolve_backend`, then a try of xformers on such inputs. With ``auto`` a
    refusal falls back to sdpa (logged once).

    Raises:
        RuntimeError: ``xformers`` requested and no xformers operator supports these inputs.
    """
    chosen = resolve_backend(backend, device)
    why = xformers_refusal(device, dtype, head_dim) if chosen == "xformers" else ""
    if why and backend == "xformers":
        raise RuntimeError(f"attention backend 'xformers': no operator for head dim {head_dim} in {dtype} on "
                           f"{device}: {why}; use 'sdpa' or 'auto'")
    if why:
        if (device.type, dtype, head_dim) not in _announced:
            _announced.add((device.type, dtype, head_dim))
            log.warning("attention: xformers has no operator for head dim %d in %s (%s): sdpa", head_dim, dtype, why)
        return "sdpa"
    return chosen


@functools.lru_cache(maxsize=256)
def _sequence_ids(seqlens: tuple, device: torch.device) -> torch.Tensor:
    lengths = torch.tensor(seqlens, device=device)
    return torch.repeat_interleave(torch.arange(len(seqlens), device=device), lengths, output_size=sum(seqlens))


class BlockDiagonal:
    """Sequences of ``seqlens`` tokens packed one after another along the token axis of a batch of one;
    each token attends only to the tokens of its own sequence."""

    def __init__(self, seqlens: Sequence[int]):
        self.seqlens = [int(n) for n in seqlens]
        self._xformers = None

    def sequence_ids(self, device: torch.device) -> torch.Tensor:
        """[N] the sequence each packed token belongs to (made once per lengths and device: a packed pass
        has the same lengths every step)."""
        return _sequence_ids(tuple(self.seqlens), device)

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
    return run_kernel(resolve_backend(backend, q.device), q, k, v, packed)


def run_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               packed: Optional[BlockDiagonal] = None) -> torch.Tensor:
    """:func:`attention` with a kernel already chosen ('xformers' or 'sdpa'): nothing decided per call."""
    if kernel == "xformers":
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
