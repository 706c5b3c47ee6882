"""Hi-End-MAE's hierarchical decoder (``objective.mae.decoder: hierarchical``): an MAE decoder that reads several
encoder depths.

The light decoder of MAE reads only the encoder's last layer. Hi-End-MAE (Tang et al., reference
FengheTan9/Hi-End-MAE) taps the encoder at chosen depths ``d_1 < ... < d_n = depth`` (default 4 evenly spaced):
the last layer's normed visible tokens plus mask tokens go through the decoder's self-attention blocks as in MAE;
then one cross-attention block per shallower tap, deep to shallow, each with self-attention, cross-attention whose
keys and values are that tap's visible tokens (the residual stream after block ``d_i``, prefix tokens included)
projected to the decoder's width, and an MLP. Loss and pixel head are MAE's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.errors import ConfigError
from pretrain.models.attention import run_kernel
from pretrain.models.blocks import Attention, Mlp, init_weights
from pretrain.objectives.base import Settings


def tap_depths(depth: int, layers: Sequence[int] = (), count: int = 4, key: str = "decoder_layers") -> List[int]:
    """The encoder depths the decoder reads, shallow to deep, the last one ``depth``: ``layers`` where given, else
    ``count`` evenly spaced (12 blocks: 3, 6, 9, 12).

    Raises:
        ConfigError: a depth outside 1..depth, not increasing, or not ending at the last block (naming ``key``).
    """
    taps = list(layers) if layers else sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)})
    if len(taps) < 2 or taps != sorted(set(taps)) or taps[0] < 1 or taps[-1] != depth:
        raise ConfigError(f"{key}={list(layers)}: at least 2 increasing encoder depths in 1..{depth}, the last one "
                          f"{depth} (got {taps})")
    return taps


@dataclass
class DecoderSettings(Settings):
    """The decoder choice masked autoencoders share (``objective.mae.*``, ``objective.videomae.*``)."""

    choices = {"decoder": ("light", "hierarchical")}

    decoder: str = "light"
    """light (MAE's: the last encoder layer only) or hierarchical (Hi-End-MAE's: decoder_depth self-attention
    blocks, then one cross-attention block per shallower depth of decoder_layers, deep to shallow)."""
    decoder_layers: List[int] = field(default_factory=list)
    """Encoder depths (1-based, increasing, ending at the encoder's last block) the hierarchical decoder reads;
    empty: 4 evenly spaced (12 blocks: 3, 6, 9, 12)."""


def decoder_taps(settings, depth: int, key: str) -> Optional[List[int]]:
    """The encoder depths a decoder of ``settings`` (a :class:`DecoderSettings`, or a run config's plain section of
    one) reads; None: the light decoder. ``key``: the section's name, for errors."""
    if getattr(settings, "decoder", "light") != "hierarchical":
        return None
    return tap_depths(depth, getattr(settings, "decoder_layers", None) or (), key=f"{key}.decoder_layers")


class CrossAttention(Attention):
    """Multi-head attention of queries from ``x`` over keys and values from ``y`` (both of this width): the fused
    ``qkv`` projection's first third projects ``x``, the other two ``y``; the kernel is bound like self-attention's."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102 - the class says it
        b, n, d = x.shape
        heads = self.num_heads
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x, weight[:d], bias[:d]).reshape(b, n, heads, d // heads).transpose(1, 2)
        k, v = F.linear(y, weight[d:], bias[d:]).reshape(b, y.shape[1], 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        out = run_kernel(self.kernel, q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossBlock(nn.Module):
    """x + self-attention(norm0 x), then x + cross-attention(norm1 x, y), then x + MLP(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_backend: str = "auto"):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class HierarchicalLayers(nn.Module):
    """The shallower taps' projections to the decoder width and one cross-attention block per tap, deep to shallow
    (``layer_proj[i]`` and ``cross_blocks[i]`` serve ``taps[-2 - i]``)."""

    def __init__(self, taps: Sequence[int], encoder_dim: int, dim: int, num_heads: int, mlp_ratio: float,
                 attn_backend: str = "auto"):
        super().__init__()
        self.taps = list(taps)
        reads = len(self.taps) - 1
        self.layer_proj = nn.ModuleList(nn.Linear(encoder_dim, dim) for _ in range(reads))
        self.cross_blocks = nn.ModuleList(CrossBlock(dim, num_heads, mlp_ratio, attn_backend) for _ in range(reads))
        self.apply(init_weights)

    def read_order(self) -> List[int]:
        """The depths the cross-attention blocks read, in the order they run (deep to shallow)."""
        return self.taps[-2::-1]

    def forward(self, x: torch.Tensor, hidden: Dict[int, torch.Tensor]) -> torch.Tensor:
        """x: [B, N, dim] after the decoder's self-attention blocks; hidden: depth -> the encoder's visible tokens
        [B, K', encoder_dim] after that block."""
        for depth, proj, block in zip(self.read_order(), self.layer_proj, self.cross_blocks):
            x = block(x, proj(hidden[depth]))
        return x


def trunk_with_taps(encoder, tokens: torch.Tensor, depths: Sequence[int]) -> tuple:
    """``encoder.forward_tokens(tokens)`` and {depth: the residual stream after block ``depth``} for the shallower
    ``depths`` (prefix tokens included), in one pass."""
    taps: Dict[int, Optional[torch.Tensor]] = {depth: None for depth in depths[:-1]}
    features = encoder.norm(encoder.trunk_tokens(tokens, taps=taps))
    return features, taps
