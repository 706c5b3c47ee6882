"""The ``objective`` section of the run configuration, assembled from the objective registry.

Each objective declares its settings dataclass where it is defined and registered
(``@register("mae", settings=MAEConfig)`` in ``pretrain/objectives/mae.py``); the section holds
``name`` and one field per registered objective, ``objective.<name>.*``. The registry is
imported when a run config is first built, not when this module is: ``import pretrain.config``
stays free of torch.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field, make_dataclass
from typing import Dict, Tuple

from pretrain.errors import ConfigError


@dataclass
class ObjectiveConfig:
    """Which self-supervised objective trains the encoder (its settings: one field per registered objective)."""

    name: str = "mae"
    """Registered objective name: mae, dinov2, videomae, or one added to ``pretrain/objectives/``."""


def registry() -> Dict[str, type]:
    """The registered objectives by name (importing them registers them)."""
    from pretrain.objectives import OBJECTIVES

    return OBJECTIVES


@functools.lru_cache(maxsize=None)
def _section(settings: Tuple[Tuple[str, type], ...]) -> type:
    """The section's dataclass for these (name, settings dataclass) pairs."""
    extra = [(name, kind, field(default_factory=kind)) for name, kind in settings]
    section = make_dataclass("ObjectiveConfig", extra, bases=(ObjectiveConfig,))
    section.__module__, section.__doc__ = __name__, ObjectiveConfig.__doc__
    return section


def objective_config() -> ObjectiveConfig:
    """The default ``objective`` section, with every registered objective's settings."""
    return _section(tuple((name, cls.settings_type) for name, cls in sorted(registry().items())))()


def resolve_name(section: ObjectiveConfig) -> None:
    """Replace a former objective name (``videomae_v2``) by its registered one, with a warning."""
    for name, cls in registry().items():
        if section.name in cls.old_names:
            warnings.warn(f"objective.name={section.name!r} is deprecated: the objective is now named {name!r} "
                          f"(its settings are objective.{name}.*); running it as {name!r}", FutureWarning,
                          stacklevel=3)
            section.name = name


def validate_objective(cfg) -> None:
    """The objective is registered, every objective's choices hold, the chosen one's settings check out,
    and model.pos_embed=rope only with an objective that trains rotary positions."""
    objectives = registry()
    name = cfg.objective.name
    if name not in objectives:
        raise ConfigError(f"objective.name={name!r} is not one of {sorted(objectives)}")
    for other in objectives:
        settings = getattr(cfg.objective, other)
        for key, allowed in settings.choices.items():
            if getattr(settings, key) not in allowed:
                raise ConfigError(f"objective.{other}.{key}={getattr(settings, key)!r} is not one of {list(allowed)}")
    getattr(cfg.objective, name).validate(cfg)
    rotary = sorted(other for other, cls in objectives.items() if cls.rotary_positions)
    if cfg.model.pos_embed == "rope" and name not in rotary:
        raise ConfigError(f"model.pos_embed=rope works with objective.name={' or '.join(rotary)}, not {name!r} "
                          "(its encoder sees a subset of the patches)")
