"""Self-supervised objectives, registered by name (see base.py for the protocol)."""
from pretrain.objectives.base import OBJECTIVES, DataSpec, Objective, ObjectiveOutput, build_objective, register
from pretrain.objectives import mae  # noqa: F401  (registers "mae")

__all__ = ["OBJECTIVES", "DataSpec", "Objective", "ObjectiveOutput", "build_objective", "register"]
