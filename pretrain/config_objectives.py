"""Objective settings of the run configuration (``objective.*``): MAE, DINOv2, VideoMAE V2."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


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
    pack_crops: str = "auto"
    """Run the student's global and local crops as one packed pass with block-diagonal attention: auto (when
    attention runs on xformers), always (sdpa with a dense mask: slower, for checking) or never (two passes)."""
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
    """Fraction of all positions the decoder leaves out (running-cell pattern: int(4 * ratio) of every 2 x 2
    cell, moving each time step; the decoder gets a mask token at the others, visible ones included, and the
    loss scores the hidden ones among them); 0 = plain VideoMAE (a mask token at every hidden tubelet)."""
    decoder_dim: int = 512
    """Decoder token width."""
    decoder_depth: int = 4
    """Decoder blocks."""
    decoder_heads: int = 8
    """Decoder attention heads."""
    norm_pix_loss: bool = True
    """Normalise each target tubelet (see target_norm)."""
    target_norm: str = "channel"
    """How norm_pix_loss normalises a target tubelet: channel (VideoMAE V2's: each channel over the tubelet's
    pixels, by its mean and unbiased std + 1e-6) or tubelet (all t*p*p*C values jointly, by sqrt(var + 1e-6),
    MAE's rule)."""


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
