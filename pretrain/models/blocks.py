"""Transformer building blocks of the ViT: attention, GELU MLP and SwiGLU feed-forwards, LayerScale, drop
path, the pre-norm block and the MAE-style initialisation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import rope as rotary
from pretrain.models.attention import DEFAULT_KERNEL, BlockDiagonal, run_kernel
from pretrain.models.norm import layer_norm


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (per packed
    sequence when the row holds several)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, packed: Optional[BlockDiagonal] = None) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        if packed is not None:  # x: [1, sum of lengths, D]; one draw per sequence, spread over its tokens
            keep = x.new_empty(len(packed.seqlens)).bernoulli_(1.0 - self.p)[packed.sequence_ids(x.device)][None, :, None]
        else:
            keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class LayerScale(nn.Module):
    """Per-channel learnable scaling of a residual branch (``gamma``, as in timm)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class KeyMaskedLinear(nn.Linear):
    """The qkv projection with its key bias held at zero (DINOv3's ``LinearKMaskedBias``): the mask applies in
    this module's own forward, so sharded-parameter engines (ZeRO-3) gather its weight and bias there."""

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim)
        self.register_buffer("bias_mask", torch.ones(3 * dim).index_fill_(0, torch.arange(dim, 2 * dim), 0.0),
                             persistent=False)
        with torch.no_grad():
            self.bias[dim:2 * dim] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class Attention(nn.Module):
    """Multi-head self-attention through :func:`pretrain.models.attention.run_kernel` with the kernel this
    layer holds: PyTorch's sdpa until :func:`pretrain.backbone.bind_kernels` sets the one chosen for the
    device and dtype the model runs in (``backend`` is the requested name it chooses from)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto", key_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend
        self.kernel = DEFAULT_KERNEL
        """The concrete kernel ('sdpa' or 'xformers'), set by :func:`pretrain.backbone.bind_kernels`."""
        self.qkv = nn.Linear(dim, dim * 3) if key_bias else KeyMaskedLinear(dim)
        self.proj = nn.Linear(dim, dim)
        self.key_bias = key_bias

    def forward(self, x: torch.Tensor, packed: Optional[BlockDiagonal] = None,
                rope: Optional[rotary.Tables] = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]; ``packed``: x holds packed sequences (B = 1); ``rope``: rotary tables
        for q and k (``model.pos_embed=rope``)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rotary.apply(q, k, rope)
        out = run_kernel(self.kernel, q, k, v, packed)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width for a given MLP ratio: two thirds of ``dim * mlp_ratio``, rounded up to a
    multiple of 8 (DINOv2's rule, so a SwiGLU block costs about what a GELU MLP of that ratio does)."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def mlp_ratio_for(ffn: str, dim: int, hidden: int) -> float:
    """The mlp_ratio that gives a block of width ``dim`` the feed-forward hidden width ``hidden`` (GELU MLP:
    ``int(dim * ratio)``; SwiGLU: :func:`swiglu_hidden`), 4.0 where that fits.

    Raises:
        ValueError: no ratio gives that width (a SwiGLU width off DINOv2's rounding to 8).
    """
    width = hidden if ffn == "mlp" else 3 * hidden // 2  # int(dim * ratio)
    candidates = [4.0, width / dim, (width + 0.5) / dim]
    for ratio in candidates:
        if (int(dim * ratio) if ffn == "mlp" else swiglu_hidden(dim, ratio)) == hidden:
            return ratio
    raise ValueError(f"no mlp_ratio gives a {ffn} hidden width of {hidden} at width {dim}")


class SwiGLU(nn.Module):
    """fc1 -> [gate | up] halves -> silu(gate) * up -> fc2 (timm's ``SwiGLUPacked`` layout)."""

    def __init__(self, dim: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.backend = backend
        self.kernel = DEFAULT_KERNEL
        """The concrete kernel ('sdpa': PyTorch ops, or 'xformers'), set by :func:`pretrain.backbone.bind_kernels`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.fc1, self.fc2, self.kernel)


def swiglu(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, kernel: str) -> torch.Tensor:
    """fc2(silu(gate) * up) with [gate | up] = fc1(x): PyTorch ops, or xformers' fused SwiGLU op (``kernel``
    'xformers', taking fc1's halves as its two input projections)."""
    if kernel == "xformers":
        import xformers.ops as xops

        w1, w2 = fc1.weight.chunk(2, dim=0)
        b1, b2 = fc1.bias.chunk(2, dim=0) if fc1.bias is not None else (None, None)
        return xops.swiglu(x, w1, b1, w2, b2, fc2.weight, fc2.bias)
    gate, up = fc1(x).chunk(2, dim=-1)
    return fc2(F.silu(gate) * up)


FFNS = ("mlp", "swiglu")


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x)); ffn is a GELU MLP
    or SwiGLU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float = 0.0,
                 drop_path: float = 0.0, attn_backend: str = "auto", ffn: str = "mlp", norm_impl: str = "torch",
                 norm_eps: float = 1e-6, key_bias: bool = True):
        super().__init__()
        if ffn not in FFNS:
            raise ValueError(f"ffn {ffn!r} is not one of {list(FFNS)}")
        self.norm1 = layer_norm(dim, norm_eps, norm_impl)
        self.attn = Attention(dim, num_heads, attn_backend, key_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init > 0 else nn.Identity()
        self.norm2 = layer_norm(dim, norm_eps, norm_impl)
        self.mlp = (Mlp(dim, int(dim * mlp_ratio)) if ffn == "mlp"
                    else SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), attn_backend))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, packed: Optional[BlockDiagonal] = None,
                rope: Optional[rotary.Tables] = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D]; ``packed``: x holds packed sequences (B = 1); ``rope``: rotary tables."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), packed, rope)), packed)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))), packed)


def init_weights(module: nn.Module) -> None:
    """MAE-style initialisation: xavier-uniform linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
