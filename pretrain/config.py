"""The run configuration: one typed dataclass per component, composed into RunConfig.

Data settings (``data.*``) live in ``config_data.py`` (re-exported here); the ``objective``
section is assembled in ``config_objectives.py`` from the objectives' own settings dataclasses,
declared where each objective is registered.

Every default lives here. A run is configured by a YAML file merged over these
defaults and then by ``a.b=c`` overrides from the command line. Unknown keys and
values of the wrong type are errors that name the key (OmegaConf structured
configs do the checking; :class:`ConfigError` carries the message).

The resolved configuration is written into every run folder as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config_data import (CTConfig, DataConfig, PhotometricConfig, SourceConfig, TransformConfig,
                                  VideoConfig)
from pretrain.config_objectives import ObjectiveConfig, objective_config, resolve_name, validate_objective
from pretrain.errors import ConfigError

__all__ = [
    "CTConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "ModelConfig",
    "ObjectiveConfig", "OptimConfig", "PhotometricConfig", "ProbeConfig", "RunConfig", "SourceConfig",
    "TrackingConfig", "TrainConfig", "TransformConfig", "VideoConfig", "flatten", "load_config",
    "source_channels", "to_yaml",
]


@dataclass
class ModelConfig:
    """The ViT encoder."""

    size: str = "tiny"
    """Size preset: tiny (tests), S, B, L, H or g. Explicit fields below override it."""
    embed_dim: Optional[int] = None
    """Token width; None takes the preset's."""
    depth: Optional[int] = None
    """Number of transformer blocks; None takes the preset's."""
    num_heads: Optional[int] = None
    """Attention heads; None takes the preset's."""
    mlp_ratio: Optional[float] = None
    """MLP hidden width / token width; None takes the preset's."""
    img_size: int = 224
    """Training image side in pixels (square)."""
    patch_size: int = 16
    """Patch side in pixels."""
    in_chans: int = 1
    """Input channels of the main stem (patch_embed, for data.modality): 1 for X-rays."""
    frames: int = 0
    """3D input: frames per clip (video) or slices per crop (CT volumes), cut into tubelets; 0 = 2D images."""
    tubelet_size: int = 2
    """Frames (or slices) per token of a 3D input: tokens are tubelet_size x patch_size x patch_size."""
    stems: Dict[str, int] = field(default_factory=dict)
    """Extra patch-embedding stems over the shared trunk, name -> channels, for the sources of a mixture
    that do not go through the main one (e.g. {ct: 3, pathology: 3} beside 1-channel X-rays); each
    source names its stem (data.sources[i].stem, by default its modality)."""
    num_registers: int = 0
    """Register tokens appended after the class token (0 = none)."""
    layer_scale_init: float = 0.0
    """Initial LayerScale value; 0 disables LayerScale."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linearly increasing with depth)."""
    attn_backend: str = "auto"
    """Attention kernel: auto | sdpa | xformers. auto takes xformers where it runs on the device."""
    pos_embed: str = "sincos"
    """Patch positions: sincos (fixed 2D sin-cos, rows in the first half of the width), sincos_mae (fixed,
    MAE's columns-first layout: weights imported from MAE), learned (a trained table initialised to sincos:
    weights imported from timm / transformers / DINOv2) or rope (DINOv3's rotary positions in every block, no
    table; square crops, the DINOv2 objective). 3D (frames > 0) models: sincos only."""
    rope_base: float = 100.0
    """pos_embed=rope: the frequencies' base (DINOv3: 100)."""
    rope_shift: float = 0.0
    """pos_embed=rope, training only: shift the patch coordinates by U(-shift, shift) per axis (0 = off)."""
    rope_jitter: float = 0.0
    """pos_embed=rope, training only: scale each axis's coordinates by a log-uniform factor in [1/jitter, jitter]
    (0 = off)."""
    rope_rescale: float = 0.0
    """pos_embed=rope, training only: scale both axes by one log-uniform factor in [1/rescale, rescale] (DINOv3
    trains with 2; 0 = off)."""
    key_bias: bool = True
    """Train the key part of the attention's qkv bias; false holds it at zero (DINOv3's masked bias: with rotary
    positions a key bias changes the features)."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm (1e-6 as timm's and DINOv2's ViTs; DINOv3's are 1e-5)."""
    ffn: str = "mlp"
    """Block feed-forward: mlp (GELU) or swiglu (DINOv2's ViT-g; hidden width 2/3 of mlp_ratio's, rounded to 8)."""
    activation_checkpointing: int = 0
    """Recompute the activations of every k-th encoder block in backward (1 = every block, 0 = off)."""
    compile: bool = False
    """torch.compile each transformer block of the trained backbone(s) (in place: names, checkpoints and
    exports are unchanged); ZeRO 0-2."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager traces without generating kernels)."""
    norm_impl: str = "auto"
    """LayerNorm kernel: auto (apex's FusedLayerNorm where apex and a GPU are present, else PyTorch), torch or apex."""


@dataclass
class OptimConfig:
    """AdamW, its parameter groups and the learning-rate schedule."""

    lr: float = 1.5e-4
    """Peak learning rate (for the whole global batch; not rescaled)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.05
    """Weight decay, not applied to norms, biases, position embeddings and special tokens."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    weight_decay_end: Optional[float] = None
    """Weight decay at the last step, reached by a cosine from weight_decay (None = constant)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay factor (1.0 = off); block i gets lr * decay^(depth - i)."""
    patch_embed_lr_mult: float = 1.0
    """Learning-rate multiplier of the patch embedding (DINOv2 uses 0.2)."""
    freeze_last_layer_steps: int = 0
    """Steps during which heads' last (prototype) layers are not updated (lr 0)."""
    clip_grad: float = 3.0
    """Gradient-norm clipping threshold (0 = off)."""
    name: str = "adamw"
    """adamw, or lamb (apex's FusedLAMB only)."""
    impl: str = "auto"
    """auto (apex's fused optimizer where apex and a GPU are present, else PyTorch's fused AdamW), torch or apex."""


@dataclass
class DistributedConfig:
    """DeepSpeed engine settings."""

    zero_stage: int = 0
    """ZeRO stage 0, 1, 2 or 3."""
    precision: str = "fp32"
    """fp32 or bf16 (bf16 keeps fp32 master weights)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    offload_optimizer: str = "none"
    """Where optimizer states (and the fp32 gradient partition) live: none (the accelerator), cpu (ZeRO 1-3),
    or nvme (ZeRO-3, ZeRO-Infinity: files under nvme_path)."""
    offload_param: str = "none"
    """Where ZeRO-3 keeps parameter partitions between uses: none, cpu or nvme (under nvme_path)."""
    nvme_path: str = ""
    """A node-local NVMe folder for nvme offload (needs DeepSpeed's async_io op: libaio)."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's default);
    0 partitions every parameter."""
    reduce_dtype: str = "fp32"
    """dtype in which bf16 gradients are accumulated over micro-batches and reduced across ranks: fp32
    (numerically safe; DeepSpeed's data_types.grad_accum_dtype and communication_data_type, where the
    stage offers them: ZeRO-0 accumulates in bf16) or bf16 (half the gradient traffic)."""
    timeout_minutes: int = 60
    """Process-group timeout: a collective that waits longer fails the run (NCCL watchdog) instead of
    hanging; well above the longest rank-0 pause (checkpoint, probe, export)."""


@dataclass
class StageConfig:
    """One stage of a run (``train.stages``, :mod:`pretrain.stages`)."""

    start: int = 0
    """Optimizer steps done when the stage begins: its settings hold from step start + 1 on."""
    set: Dict[str, Any] = field(default_factory=dict)
    """Dotted keys and their values from then on, over the earlier stages' (see pretrain.stages.STAGE_KEYS)."""


@dataclass
class TrainConfig:
    """The step loop."""

    steps: int = 100
    """Optimizer steps to run."""
    log_every: int = 1
    """Log scalar metrics every N steps."""
    image_every: int = 0
    """Log a reconstruction image every N steps (0 = only at the end)."""
    max_nonfinite: int = 5
    """Stop after this many consecutive non-finite losses (each one skips its step)."""
    deterministic: bool = False
    """Use deterministic kernels (for exact-resume checks)."""
    peak_tflops: float = 0.0
    """Dense peak of one accelerator in TFLOP/s (set from the cluster profile's gpu_peak_tflops by `pretrain
    submit`): each logged step then has ``mfu`` = planner FLOPs per step / step time / world / this peak."""
    stop_signal: str = "USR1"
    """Signal on which the run finishes its step, checkpoints and exits with code 75 (requeue me)."""
    stages: List[StageConfig] = field(default_factory=list)
    """Later stages of the run (e.g. a short high-resolution phase: model.img_size 224 -> 512, smaller batch, lower
    lr), in order of ``start``; empty: one stage, this config."""


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    backend: str = "mlflow"
    """mlflow, or jsonl: metrics as JSON lines in <run>/metrics.jsonl (params and tags in <run>/tracking.json),
    for machines without MLflow."""
    uri: str = ""
    """Tracking URI; empty = MLFLOW_TRACKING_URI if set, else sqlite in the run folder."""
    experiment: str = "pretrain"
    """MLflow experiment name."""
    enabled: bool = True
    """Turn tracking off entirely."""
    system_metrics: bool = True
    """Log CPU, memory, disk, network and (with pynvml) GPU use as system/* metrics."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples."""
    flush_timeout_s: float = 60.0
    """At each checkpoint rank 0 waits up to this long for the queued tracking calls (others wait for it in
    the next collective, so keep it well under distributed.timeout_minutes); what is left stays queued."""
    queue_size: int = 10000
    """Tracking calls held while the tracking thread catches up (a server down or slow); when full, training
    waits for room rather than drop a metric."""


@dataclass
class ProbeConfig:
    """Frozen-feature probes on a small labelled set during pretraining."""

    shards: str = ""
    """Labelled evaluation shards (image, CT volume or video + .cls; 2D images + .seg.png masks for the dense
    probe); empty = no probes."""
    modality: str = ""
    """Modality of the evaluation shards (xray, pathology, ct, video); empty = data.modality. A
    modality of one of model.stems is fed through that stem."""
    every: int = 0
    """Probe every N steps, and once before the first step of a new run (the untrained baseline, step 0);
    0 = only at the end, when shards are set."""
    max_samples: int = 1000
    """Samples read from the evaluation shards (kept in memory)."""
    query_fraction: float = 0.5
    """Fraction of samples used as queries; the rest is the kNN bank and the linear probe's training set."""
    k: int = 20
    """Neighbours for kNN."""
    temperature: float = 0.07
    """Temperature of the kNN vote weights exp(similarity / T)."""
    linear_steps: int = 100
    """L-BFGS iterations of the linear probe."""
    batch_size: int = 64
    """Images per forward pass when extracting features."""
    dense_patches: int = 50000
    """Dense probe (a set with masks, ``pretrain shards ... --masks``): bank patches its linear classifier is
    fitted on (a fixed random subset where there are more)."""


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints with trainer and data-stream state."""

    every: int = 50
    """Save every N steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """auto (newest complete checkpoint of this run that verifies, if any), none, or a checkpoint folder."""
    verify: str = "size"
    """What resuming checks of a checkpoint against its completion marker before loading it: size (every
    file's size) or checksum (also every file's CRC-32, reading every byte). A damaged checkpoint is passed
    over for the one before it."""
    writer: str = "auto"
    """How checkpoint files are written: inline (the run waits for the write), background (from a host copy,
    pinned on GPUs, by a background thread: the run waits for the copy, and for the write only before the
    next checkpoint, a stop or the end), or auto (inline until a save holds the run for over 5% of the
    time since the one before, then in the background where the host copy fits in memory and the step
    leaves a core free: a GPU run, or fewer torch threads than cores)."""
    init_from: str = ""
    """Encoder weights to start a fresh run from: a `pretrain import` folder (official MAE / DINOv2 / timm /
    transformers weights) or an export bundle of ours. The run's model settings must match its shapes
    (img_size may differ: a learned table is resampled). Ignored, with a log line, when the run resumes."""


@dataclass
class RunConfig:
    """Everything one pretraining run needs."""

    name: str = "mae_tiny"
    """Run name: the run folder is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Folder holding run folders."""
    seed: int = 0
    """Seed for initialisation, data order, augmentation and masking."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=objective_config)
    """objective.name and each registered objective's settings (``objective.<name>.*``)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> str:
        """The run folder: <output_dir>/<name>."""
        return os.path.join(self.output_dir, self.name)


_CHOICES = {
    "model.size": ("tiny", "S", "B", "L", "H", "g"),
    "model.attn_backend": ("auto", "sdpa", "xformers"),
    "model.ffn": ("mlp", "swiglu"),
    "model.pos_embed": ("sincos", "sincos_mae", "learned", "rope"),
    "model.norm_impl": ("auto", "torch", "apex"),
    "optim.impl": ("auto", "torch", "apex"),
    "optim.name": ("adamw", "lamb"),
    "distributed.precision": ("fp32", "bf16"),
    "distributed.zero_stage": (0, 1, 2, 3),
    "distributed.offload_optimizer": ("none", "cpu", "nvme"),
    "distributed.offload_param": ("none", "cpu", "nvme"),
    "distributed.reduce_dtype": ("fp32", "bf16"),
    "tracking.backend": ("mlflow", "jsonl"),
    "data.split_by": ("shard", "sample"),
    "data.on_error": ("skip", "raise"),
    "data.decode_device": ("cpu", "cuda"),
    "checkpoint.verify": ("size", "checksum"),
    "checkpoint.writer": ("auto", "inline", "background"),
    "data.modality": ("xray", "pathology", "ct", "video"),
    "data.video.sampling": ("stride", "segment"),
    "probe.modality": ("", "xray", "pathology", "ct", "video"),
    "data.transforms.photometric.colour": ("auto", "intensity", "rgb", "stain", "none"),
}


def _validate_signal(name: str) -> None:
    import signal

    if not hasattr(signal, f"SIG{name}"):
        raise ConfigError(f"train.stop_signal={name!r} is not a signal name (USR1, USR2, TERM...)")


def _validate_compile(cfg: RunConfig) -> None:
    if cfg.model.compile and cfg.distributed.zero_stage == 3:
        raise ConfigError("model.compile=true with distributed.zero_stage=3: ZeRO-3 gathers parameters in module "
                          "hooks that compiled blocks would trace through; use ZeRO 0-2 or model.compile=false")


def _validate_offload(d: DistributedConfig) -> None:
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        raise ConfigError(f"distributed.offload_optimizer={d.offload_optimizer} needs ZeRO 1-3 (zero_stage=0)")
    if d.offload_optimizer == "nvme" and d.zero_stage != 3:
        raise ConfigError("distributed.offload_optimizer=nvme needs distributed.zero_stage=3 (ZeRO-Infinity)")
    if d.offload_param != "none" and d.zero_stage != 3:
        raise ConfigError(f"distributed.offload_param={d.offload_param} needs distributed.zero_stage=3 "
                          f"(only ZeRO-3 partitions parameters; zero_stage={d.zero_stage})")
    if d.timeout_minutes < 1:
        raise ConfigError(f"distributed.timeout_minutes={d.timeout_minutes} must be at least 1")
    if "nvme" in (d.offload_optimizer, d.offload_param) and not d.nvme_path:
        raise ConfigError("distributed.nvme_path: nvme offload needs a node-local folder (e.g. /local/nvme)")


def _validate_choices(cfg: RunConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    for index, source in enumerate(cfg.data.sources):
        if source.modality not in _CHOICES["data.modality"]:
            raise ConfigError(f"data.sources[{index}] ({source.name}): modality={source.modality!r} is not one of "
                              f"{list(_CHOICES['data.modality'])}")


def _validate(cfg: RunConfig) -> None:
    _validate_signal(cfg.train.stop_signal)
    _validate_offload(cfg.distributed)
    if cfg.model.frames and cfg.model.pos_embed != "sincos":
        raise ConfigError(f"model.pos_embed={cfg.model.pos_embed}: 3D models (model.frames={cfg.model.frames}) have "
                          "the fixed sincos table only")
    validate_objective(cfg)
    _validate_compile(cfg)
    if cfg.model.img_size % cfg.model.patch_size:
        raise ConfigError(
            f"model.img_size={cfg.model.img_size} is not a multiple of model.patch_size={cfg.model.patch_size}"
        )
    if not 0.0 < cfg.probe.query_fraction < 1.0:
        raise ConfigError(f"probe.query_fraction={cfg.probe.query_fraction} must be in (0, 1)")
    _validate_sources(cfg)
    if urlsplit(cfg.tracking.uri).password:
        raise ConfigError("tracking.uri holds a password, which config.yaml and the MLflow params would keep: give "
                          "the URI without it and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    retry = cfg.data.retry
    if retry.attempts < 0 or not 0 < retry.initial_s <= retry.max_s:
        raise ConfigError(f"data.retry: attempts={retry.attempts} must be >= 0 and 0 < initial_s={retry.initial_s} "
                          f"<= max_s={retry.max_s}")
    if cfg.train.stages:
        from pretrain.stages import validate_stages

        validate_stages(cfg, _validate)



def source_channels(model: ModelConfig, source: SourceConfig) -> int:
    """Channels of the stem a (resolved) source goes through: model.in_chans for the main one, else its
    entry of model.stems."""
    return model.stems[source.stem] if source.stem else model.in_chans


def _validate_sources(cfg: RunConfig) -> None:
    names = [source.name for source in cfg.data.sources]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"data.sources need unique, non-empty names; got {names}")
    for index, source in enumerate(cfg.data.sources):
        where = f"data.sources[{index}] ({source.name})"
        if not source.shards:
            raise ConfigError(f"{where}: shards is empty")
        if source.weight <= 0:
            raise ConfigError(f"{where}: weight={source.weight} must be positive")
        chans = source_channels(cfg.model, source)
        if len(source.transforms.mean) != chans or len(source.transforms.std) != chans:
            raise ConfigError(f"{where}: transforms.mean/std need {chans} values, got "
                              f"{len(source.transforms.mean)}/{len(source.transforms.std)}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """Build a RunConfig from the defaults, an optional YAML file and ``a.b=c`` overrides.

    Raises:
        ConfigError: a missing file, an unknown key or a value of the wrong type; the
            message names the file and the key.
    """
    schema = OmegaConf.structured(RunConfig)
    where = "command line"
    try:
        if path:
            where = path
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            schema = OmegaConf.merge(schema, OmegaConf.load(path))
        where = "command-line override"
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(overrides or [])))
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{where}: bad config key {key!r}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    resolve_name(cfg.objective)
    _validate_choices(cfg)
    cfg.data.resolve_sources(cfg.model.stems)
    _validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what actually ran; a lone short-form source stays in the short form)."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.replace(cfg, data=cfg.data.in_short_form())))


def flatten(cfg: RunConfig) -> dict:
    """The config as a flat {'a.b': value} dict (MLflow params)."""
    out = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                out[name] = value

    walk("", dataclasses.asdict(cfg))
    return out
