"""Backbones and their parts: plain modules built from already-chosen kernels. Nothing here imports
DeepSpeed, torch.distributed or anything of ``pretrain`` outside this package; building a backbone from
a run config is :mod:`pretrain.backbone`'s."""
from pretrain.models.vit import VisionTransformer, VIT_PRESETS

__all__ = ["VisionTransformer", "VIT_PRESETS"]
