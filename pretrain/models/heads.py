"""Projection heads for self-distillation objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Prototypes(nn.Module):
    """Weight-normalised linear layer without bias (gain fixed to 1): logits are cosine similarities.

    The normalisation happens in this module's own forward, so sharded-parameter engines
    (ZeRO-3) gather ``weight`` when it is used.
    """

    def __init__(self, dim: int, prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(prototypes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, dim] (unit rows) -> [N, prototypes]."""
        return x @ F.normalize(self.weight, dim=1, eps=1e-6).t()


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO / iBOT head).

    The prototype layer ``last_layer`` (:class:`Prototypes`) gives cosine similarities in
    [-1, 1]. Optimisers find it by name to freeze it early in training.

    Args:
        in_dim: backbone width.
        prototypes: output width K.
        hidden_dim: hidden width of the MLP.
        bottleneck_dim: width before the prototypes.
        layers: linear layers of the MLP (>= 1; the last maps to the bottleneck).
    """

    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a DINO head needs at least 1 layer, got {layers}")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        parts = []
        for index in range(layers):
            parts.append(nn.Linear(widths[index], widths[index + 1]))
            if index < layers - 1:
                parts.append(nn.GELU())
        self.mlp = nn.Sequential(*parts)
        self.last_layer = Prototypes(bottleneck_dim, prototypes)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> logits [N, prototypes] in [-1, 1]."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))
