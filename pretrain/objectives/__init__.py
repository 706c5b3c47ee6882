"""Self-supervised objectives, registered by name (see base.py for the protocol)."""
from pretrain.objectives.base import OBJECTIVES, DataSpec, Objective, ObjectiveOutput, build_objective, register
from pretrain.objectives import dinov2, mae, videomae  # noqa: F401  (register "dinov2", "mae", "videomae_v2")

__all__ = ["OBJECTIVES", "DataSpec", "Objective", "ObjectiveOutput", "build_objective", "register"]
