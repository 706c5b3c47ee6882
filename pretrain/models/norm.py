"""The LayerNorm of the ViT's blocks and final norm, from an implementation already chosen.

Which implementation runs (``model.norm_impl``: auto | torch | apex) is decided where the model is
built (:func:`pretrain.backbone.build_vit`, which asks :mod:`pretrain.kernels` and logs the choice);
the model only constructs what it is given. apex's FusedLayerNorm keeps PyTorch's parameter names
(``weight``, ``bias``), so checkpoints and exports do not depend on the choice.
"""
from __future__ import annotations

from torch import nn

NORM_IMPLS = ("torch", "apex")


def layer_norm(dim: int, eps: float, impl: str = "torch") -> nn.Module:
    """A LayerNorm over the last ``dim`` features: apex's FusedLayerNorm for ``impl`` 'apex', PyTorch's
    for 'torch'.

    Raises:
        ValueError: ``impl`` is not a resolved name (``auto`` is resolved by the builder, not here).
    """
    if impl not in NORM_IMPLS:
        raise ValueError(f"LayerNorm implementation {impl!r} is not one of {list(NORM_IMPLS)}")
    if impl == "apex":
        from apex.normalization import FusedLayerNorm

        return FusedLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)
