"""The run configuration: one typed dataclass per component, composed into RunConfig.

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
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


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
    """Extra patch-embedding stems over the shared trunk, modality -> channels, for the sources of a
    mixture whose modality is not data.modality (e.g. {ct: 3, pathology: 3} beside 1-channel X-rays)."""
    num_registers: int = 0
    """Register tokens appended after the class token (0 = none)."""
    layer_scale_init: float = 0.0
    """Initial LayerScale value; 0 disables LayerScale."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linearly increasing with depth)."""
    attn_backend: str = "auto"
    """Attention kernel: auto | sdpa | xformers. auto takes xformers where it runs on the device."""
    ffn: str = "mlp"
    """Block feed-forward: mlp (GELU) or swiglu (DINOv2's ViT-g; hidden width 2/3 of mlp_ratio's, rounded to 8)."""
    activation_checkpointing: int = 0
    """Recompute the activations of every k-th encoder block in backward (1 = every block, 0 = off)."""


@dataclass
class MAEConfig:
    """Masked autoencoder objective."""

    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder."""
    decoder_dim: int = 512
    """Decoder token width."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_heads: int = 16
    """Decoder attention heads."""
    norm_pix_loss: bool = True
    """Normalise each target patch by its own mean and variance."""


@dataclass
class DINOv2Config:
    """DINOv2 self-distillation (DINO + iBOT + KoLeo) with an EMA teacher. Defaults are DINOv2's at full size."""

    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    """Area range of the 2 global crops (their side is model.img_size)."""
    local_crops_number: int = 8
    """Local crops per image (0 = global crops only)."""
    local_crops_size: int = 96
    """Side of each local crop in pixels (a multiple of the patch size)."""
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    """Area range of the local crops."""
    head_prototypes: int = 65536
    """Prototypes (output width) of the DINO head."""
    head_hidden_dim: int = 2048
    """Hidden width of the head MLPs."""
    head_bottleneck_dim: int = 256
    """Bottleneck width before the weight-normalised prototype layer."""
    head_layers: int = 3
    """Linear layers of each head MLP (the last one ends in the bottleneck)."""
    ibot_separate_head: bool = False
    """Give iBOT its own head (else patch tokens go through the DINO head)."""
    ibot_prototypes: int = 65536
    """Prototypes of the separate iBOT head."""
    dino_loss_weight: float = 1.0
    """Weight of the DINO class-token loss."""
    ibot_loss_weight: float = 1.0
    """Weight of the iBOT masked-patch loss (0 = no masking, no iBOT)."""
    koleo_loss_weight: float = 0.1
    """Weight of the KoLeo regulariser on the student's global class tokens."""
    mask_ratio: List[float] = field(default_factory=lambda: [0.1, 0.5])
    """Range of the fraction of patches masked in a masked global crop."""
    mask_probability: float = 0.5
    """Probability that a global crop is masked at all."""
    centering: str = "sinkhorn"
    """Teacher output centering: sinkhorn (Sinkhorn-Knopp) or softmax (running centre)."""
    center_momentum: float = 0.9
    """Momentum of the running centre (centering=softmax)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp normalisation rounds."""
    student_temp: float = 0.1
    """Temperature of the student softmax."""
    teacher_temp: float = 0.07
    """Teacher temperature after its warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    warmup_teacher_temp_steps: int = 30
    """Steps of the linear teacher-temperature warm-up."""
    momentum_teacher: float = 0.992
    """EMA momentum at step 0; it follows a cosine to final_momentum_teacher."""
    final_momentum_teacher: float = 1.0
    """EMA momentum at the last step."""


@dataclass
class VideoMAEConfig:
    """VideoMAE V2 on clips and volumes: tube (video) or random 3D (volume) encoder masking, running-cell
    decoder masking. Defaults are VideoMAE V2's."""

    mask_ratio: float = 0.9
    """Fraction of tubelets hidden from the encoder."""
    encoder_masking: str = "auto"
    """tube (the same spatial mask in every time step), random (any tubelet), or auto: tube for video,
    random for CT volumes."""
    decoder_mask_ratio: float = 0.5
    """Fraction of the hidden tubelets the decoder leaves out (running-cell pattern); 0 = plain VideoMAE
    (the decoder reconstructs every hidden tubelet)."""
    decoder_dim: int = 512
    """Decoder token width."""
    decoder_depth: int = 4
    """Decoder blocks."""
    decoder_heads: int = 8
    """Decoder attention heads."""
    norm_pix_loss: bool = True
    """Normalise each target tubelet by its own mean and variance."""


@dataclass
class ObjectiveConfig:
    """Which self-supervised objective trains the encoder, and its settings."""

    name: str = "mae"
    """Registered objective name: mae, dinov2 or videomae_v2."""
    mae: MAEConfig = field(default_factory=MAEConfig)
    """Settings used when name == 'mae'."""
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    """Settings used when name == 'dinov2'."""
    videomae: VideoMAEConfig = field(default_factory=VideoMAEConfig)
    """Settings used when name == 'videomae_v2'."""


@dataclass
class PhotometricConfig:
    """Colour and intensity augmentations of multi-crop views (DINOv2); single views ignore them."""

    colour: str = "auto"
    """auto (by modality: xray -> intensity, pathology -> stain), intensity (brightness/contrast only,
    for 1-channel images), rgb (colour jitter + grayscale), stain (H&E stain jitter + brightness/contrast),
    or none."""
    jitter_probability: float = 0.8
    """Probability of applying the jitter to a view."""
    brightness: float = 0.4
    """Brightness factor range 1 +- this."""
    contrast: float = 0.4
    """Contrast factor range 1 +- this."""
    saturation: float = 0.2
    """Saturation factor range 1 +- this (rgb)."""
    hue: float = 0.1
    """Hue shift range +- this (rgb)."""
    stain_sigma: float = 0.05
    """Stain jitter: each H, E, D optical-density channel is scaled by 1 +- sigma and shifted by +- sigma."""
    grayscale_probability: float = 0.2
    """Probability of converting a view to grayscale (rgb)."""
    blur_probability: List[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    """Gaussian blur probability of the first global crop, the second one, and each local crop."""
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    """Gaussian blur sigma range in pixels."""
    solarize_probability: float = 0.2
    """Probability of solarising the second global crop."""


@dataclass
class TransformConfig:
    """2D augmentations and intensity normalisation."""

    crop_scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    """Random-resized-crop area range, as fractions of the image."""
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333])
    """Random-resized-crop aspect ratio range."""
    hflip: bool = False
    """Random horizontal flips (off for chest X-rays: anatomy is lateralised)."""
    vflip: bool = False
    """Random vertical flips (pathology tiles have no up or down)."""
    rotate90: bool = False
    """Random turns by 0, 90, 180 or 270 degrees (pathology tiles)."""
    mean: List[float] = field(default_factory=lambda: [0.5])
    """Per-channel mean subtracted after scaling intensities to [0, 1]."""
    std: List[float] = field(default_factory=lambda: [0.25])
    """Per-channel std divided after subtracting the mean."""
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    """Colour / intensity augmentations of multi-crop views."""


@dataclass
class CTConfig:
    """CT volumes: resampling, HU windows, 2.5D slabs (2D objectives) and 3D crops (volume objectives)."""

    target_spacing: List[float] = field(default_factory=lambda: [1.5, 1.0, 1.0])
    """Voxel spacing [z, y, x] in mm every volume is resampled to."""
    windows: List[List[float]] = field(default_factory=lambda: [[40.0, 400.0]])
    """HU windows [centre, width], one channel each (e.g. soft tissue [40, 400], lung [-600, 1500],
    bone [400, 1800])."""
    slices: int = 3
    """2D objectives (2.5D mode): adjacent axial slices per sample; channels = slices x windows."""
    air_hu: float = -1024.0
    """HU of voxels outside the volume (padding of crops larger than the volume)."""


@dataclass
class VideoConfig:
    """Video clips: which frames a sample takes (the clip length comes from the objective)."""

    sampling: str = "stride"
    """stride (every `stride`-th frame from a random start) or segment (one random frame in each of
    T equal segments of the clip)."""
    stride: int = 4
    """Frame step of stride sampling."""


@dataclass
class SourceConfig:
    """One source of a data mixture: its shards, modality, share of the batches and transforms."""

    name: str = ""
    """Name of the source (metrics, stream positions); must be unique in the mixture."""
    shards: str = ""
    """Shard URL(s), as data.shards."""
    modality: str = "xray"
    """xray, pathology, ct or video."""
    weight: float = 1.0
    """Share of the batches (relative to the other sources' weights)."""
    transforms: TransformConfig = field(default_factory=TransformConfig)
    """Augmentations and normalisation of this source (mean/std: one value per channel)."""
    ct: CTConfig = field(default_factory=CTConfig)
    """CT settings (modality ct)."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Frame sampling (modality video)."""


@dataclass
class DataConfig:
    """Where the shards are and how they stream."""

    shards: str = "runs/demo_shards"
    """Shard URL(s): a brace pattern, a comma-separated list, or a folder/URL holding manifest.json."""
    modality: str = "xray"
    """Modality of the shards (decides decoding and transforms): xray, pathology (RGB tiles), ct (volumes)
    or video (clips)."""
    batch_size: int = 8
    """Micro-batch per process."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = read in the training process)."""
    shuffle_buffer: int = 64
    """Samples held in the shuffle buffer (0 = no shuffling within shards)."""
    shuffle_shards: bool = True
    """Shuffle the shard order each pass."""
    split_by: str = "shard"
    """shard: each reader gets its own shards. sample: every reader reads all shards and keeps
    every n-th sample (for datasets with fewer shards than readers; world-size independent)."""
    transforms: TransformConfig = field(default_factory=TransformConfig)
    """Augmentations and normalisation."""
    ct: CTConfig = field(default_factory=CTConfig)
    """CT resampling, windows and slab / crop settings (modality ct)."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Frame sampling (modality video)."""
    sources: List[SourceConfig] = field(default_factory=list)
    """A mixture: several sources mixed by weight, one source per batch. Empty = the one source above
    (shards, modality, transforms, ct, video)."""


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


@dataclass
class DistributedConfig:
    """DeepSpeed engine settings."""

    zero_stage: int = 0
    """ZeRO stage 0, 1, 2 or 3."""
    precision: str = "fp32"
    """fp32 or bf16 (bf16 keeps fp32 master weights)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO 1-3)."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's default);
    0 partitions every parameter."""


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
    stop_signal: str = "USR1"
    """Signal on which the run finishes its step, checkpoints and exits with code 75 (requeue me)."""


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

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


@dataclass
class ProbeConfig:
    """Frozen-feature probes on a small labelled set during pretraining."""

    shards: str = ""
    """Labelled evaluation shards (.png + .cls); empty = no probes."""
    every: int = 0
    """Probe every N steps (0 = only at the end, when shards are set)."""
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


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints with trainer and data-stream state."""

    every: int = 50
    """Save every N steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """auto (newest complete checkpoint of this run, if any), none, or a checkpoint folder."""


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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
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
    "distributed.precision": ("fp32", "bf16"),
    "distributed.zero_stage": (0, 1, 2, 3),
    "data.split_by": ("shard", "sample"),
    "data.modality": ("xray", "pathology", "ct", "video"),
    "data.video.sampling": ("stride", "segment"),
    "data.transforms.photometric.colour": ("auto", "intensity", "rgb", "stain", "none"),
    "objective.dinov2.centering": ("sinkhorn", "softmax"),
    "objective.videomae.encoder_masking": ("auto", "tube", "random"),
}


def _validate_signal(name: str) -> None:
    import signal

    if not hasattr(signal, f"SIG{name}"):
        raise ConfigError(f"train.stop_signal={name!r} is not a signal name (USR1, USR2, TERM...)")


def _validate(cfg: RunConfig) -> None:
    _validate_signal(cfg.train.stop_signal)
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    if not 0.0 < cfg.objective.mae.mask_ratio < 1.0:
        raise ConfigError(f"objective.mae.mask_ratio={cfg.objective.mae.mask_ratio} must be in (0, 1)")
    dino = cfg.objective.dinov2
    if cfg.objective.name == "dinov2" and dino.local_crops_number and dino.local_crops_size % cfg.model.patch_size:
        raise ConfigError(f"objective.dinov2.local_crops_size={dino.local_crops_size} is not a multiple of "
                          f"model.patch_size={cfg.model.patch_size}")
    if not 0.0 <= dino.mask_ratio[0] <= dino.mask_ratio[1] < 1.0:
        raise ConfigError(f"objective.dinov2.mask_ratio={list(dino.mask_ratio)} must be [low, high] in [0, 1)")
    if cfg.model.img_size % cfg.model.patch_size:
        raise ConfigError(
            f"model.img_size={cfg.model.img_size} is not a multiple of model.patch_size={cfg.model.patch_size}"
        )
    if cfg.probe.shards and cfg.model.frames:
        raise ConfigError("probe.shards: probes measure 2D encoders; this model is 3D (model.frames is set)")
    if cfg.objective.name == "videomae_v2" and cfg.data.modality not in ("video", "ct"):
        raise ConfigError(f"objective videomae_v2 trains on clips or volumes; data.modality={cfg.data.modality}")
    if not 0.0 < cfg.probe.query_fraction < 1.0:
        raise ConfigError(f"probe.query_fraction={cfg.probe.query_fraction} must be in (0, 1)")
    _validate_sources(cfg)
    if len(cfg.data.transforms.mean) != cfg.model.in_chans or len(cfg.data.transforms.std) != cfg.model.in_chans:
        raise ConfigError(
            f"data.transforms.mean/std need {cfg.model.in_chans} values (model.in_chans), "
            f"got {len(cfg.data.transforms.mean)}/{len(cfg.data.transforms.std)}"
        )


def source_channels(model: ModelConfig, data: DataConfig, modality: str) -> int:
    """Channels of the stem a modality goes through: model.in_chans for data.modality, else model.stems."""
    return model.in_chans if modality == data.modality else model.stems.get(modality, model.in_chans)


def _validate_sources(cfg: RunConfig) -> None:
    names = [source.name for source in cfg.data.sources]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"data.sources need unique, non-empty names; got {names}")
    for index, source in enumerate(cfg.data.sources):
        where = f"data.sources[{index}] ({source.name})"
        if source.modality not in _CHOICES["data.modality"]:
            raise ConfigError(f"{where}: modality={source.modality!r} is not one of {list(_CHOICES['data.modality'])}")
        if not source.shards:
            raise ConfigError(f"{where}: shards is empty")
        if source.weight <= 0:
            raise ConfigError(f"{where}: weight={source.weight} must be positive")
        if source.modality != cfg.data.modality and source.modality not in cfg.model.stems:
            raise ConfigError(f"{where}: modality {source.modality} needs a stem: set model.stems.{source.modality}="
                              f"<channels> (data.modality={cfg.data.modality} uses model.in_chans)")
        chans = source_channels(cfg.model, cfg.data, source.modality)
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
    _validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what actually ran)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


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
