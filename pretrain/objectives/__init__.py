"""Self-supervised objectives, registered by name (see base.py for the protocol).

A new objective is its own module here (its Objective class, registered with its settings
dataclass), one import line below, and a recipe in ``pretrain/configs/``.
"""
from pretrain.objectives.base import (OBJECTIVES, Activation, DataSpec, Objective, ObjectiveOutput, Settings, TrunkPass,
                                      build_objective, register)
from pretrain.objectives import dinov2, distill, mae, videomae  # noqa: F401  (register each by name)

__all__ = ["OBJECTIVES", "Activation", "DataSpec", "Objective", "ObjectiveOutput", "Settings", "TrunkPass",
           "build_objective", "register"]
