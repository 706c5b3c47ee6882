"""Backbones and their parts. Nothing here imports DeepSpeed or torch.distributed."""
from pretrain.models.vit import VisionTransformer, build_vit, VIT_PRESETS

__all__ = ["VisionTransformer", "build_vit", "VIT_PRESETS"]
