"""Stages of one run (``train.stages``): from a given step on, some settings change, e.g. DINOv3's short
high-resolution phase at the end of a DINOv2 run (global crops 224 -> 512, a smaller batch, a lower lr, Gram
anchoring reweighted) without a second config or job.

A stage is ``{start: S, set: {dotted.key: value}}``: once S optimizer steps are done, the run's config is the
base config with the ``set`` of every stage started so far applied in order. Which stage holds is a function of
the step alone, so a run resumed anywhere (before, at or after a switch) rebuilds the same config; what the
trainer does at a switch is what a resume at that step does: the loader is rebuilt from the stream position
(no sample read twice or skipped), the objective takes the new settings, the RNG states are kept. The lr table
is made per stage in advance (:meth:`Stages.optim_at`). The model is always built from the base config: its
position table keeps the base grid and is resampled to a stage's grid in each forward
(:meth:`VisionTransformer.positions`).

Only the settings that change no parameter shape and no optimizer group may change (:data:`STAGE_KEYS`).
"""
from __future__ import annotations

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.errors import ConfigError

STAGE_KEYS = ("model.img_size", "data.batch_size", "optim.lr", "optim.min_lr", "objective.dinov2.local_crops_size",
              "objective.dinov2.global_crops_scale", "objective.dinov2.local_crops_scale")
"""The keys a stage may set; and every key under ``objective.dinov2.gram.`` but ``teacher`` (a run with Gram
anchoring on from its base config: its teacher's schedule, weight and scale)."""
RESIZABLE = ("dinov2",)
"""Objectives whose input side (``model.img_size``: DINOv2's global crops) may change at a stage: MAE-style
objectives draw their masks for the base grid."""


def allowed(key: str) -> bool:
    """True for a key a stage may set."""
    gram = key.startswith("objective.dinov2.gram.") and key != "objective.dinov2.gram.teacher"
    return key in STAGE_KEYS or gram


def stage_configs(cfg, validate=None) -> list:
    """The config of every stage: ``[base, base + stage 1, base + stages 1-2, ...]`` (their ``train.stages``
    emptied; each checked by ``validate`` where given: :func:`pretrain.config.load_config`'s checks, which pass
    them here; a loaded config's stages were checked then).

    Raises:
        ConfigError: naming ``train.stages[i]`` and the key for a key a stage may not set or a bad value.
    """
    made, conf = [], OmegaConf.structured(cfg)
    conf.train.stages = []
    made.append(OmegaConf.to_object(conf))
    for index, stage in enumerate(cfg.train.stages):
        for key, value in stage.set.items():
            if not allowed(key):
                raise ConfigError(f"train.stages[{index}].set: {key} cannot change in a stage (one of "
                                  f"{', '.join(STAGE_KEYS)} or objective.dinov2.gram.*)")
            try:
                OmegaConf.update(conf, key, value, merge=False)
            except OmegaConfBaseException as exc:
                raise ConfigError(f"train.stages[{index}].set: {key}={value!r}: {exc}") from None
        staged = OmegaConf.to_object(conf)
        staged.data.resolve_sources(staged.model.stems)
        try:
            if validate:
                validate(staged)
        except ConfigError as exc:
            raise ConfigError(f"train.stages[{index}] (from step {stage.start}): {exc}") from None
        made.append(staged)
    return made


def validate_stages(cfg, validate) -> None:
    """Stages in order inside the run, on a run they can apply to, each stage's config passing ``validate``.

    Raises:
        ConfigError: naming ``train.stages`` and what is wrong.
    """
    starts = [stage.start for stage in cfg.train.stages]
    if any(b <= a for a, b in zip(starts, starts[1:])) or not 0 < starts[0] or starts[-1] >= cfg.train.steps:
        raise ConfigError(f"train.stages: starts {starts} must increase, each in 1..train.steps-1 "
                          f"({cfg.train.steps - 1})")
    keys = {key for stage in cfg.train.stages for key in stage.set}
    if "model.img_size" in keys and cfg.objective.name not in RESIZABLE:
        raise ConfigError(f"train.stages: model.img_size cannot change in a {cfg.objective.name} run (only "
                          f"{', '.join(RESIZABLE)}: its masks are drawn for the base grid)")
    if any(key.startswith("objective.dinov2.gram.") for key in keys) and not cfg.objective.dinov2.gram.weight:
        raise ConfigError("train.stages: Gram settings change in a stage of a run without Gram anchoring: set "
                          "objective.dinov2.gram.weight (and gram.start_step for when it starts) in the base config")
    if cfg.objective.name == "distill" and getattr(cfg.objective.distill, "students", None):
        raise ConfigError("train.stages: a run of several students has one stage")
    stage_configs(cfg, validate)


def stage_index(cfg, step: int) -> int:
    """The stage that holds once ``step`` optimizer steps are done (0: the base config)."""
    return sum(1 for stage in cfg.train.stages if step >= stage.start)


class Stages:
    """A run's stages: the config that holds at a step, and where the switches are. Without ``train.stages``,
    one stage: the config itself."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.configs = stage_configs(cfg) if cfg.train.stages else [cfg]

    def index(self, step: int) -> int:
        """The stage that holds once ``step`` steps are done."""
        return stage_index(self.cfg, step)

    def config(self, step: int):
        """The config that holds once ``step`` steps are done."""
        return self.configs[self.index(step)]

    def optim_at(self, step: int):
        """The optim settings that hold once ``step`` steps are done (for the lr table)."""
        return self.config(step).optim

    def begins(self, step: int) -> bool:
        """True when a stage begins once ``step`` steps are done."""
        return any(stage.start == step for stage in self.cfg.train.stages)

    def describe(self, index: int) -> str:
        """``stage I from step S: key=value, ...`` (or ``stage 0: the base config``)."""
        if not index:
            return "stage 0: the base config"
        stage = self.cfg.train.stages[index - 1]
        return f"stage {index} from step {stage.start}: " + ", ".join(f"{k}={v}" for k, v in stage.set.items())
