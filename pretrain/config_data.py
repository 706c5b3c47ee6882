"""Data settings of the run configuration (``data.*``): sources, transforms, CT and video."""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from pretrain.errors import ConfigError


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
    stem: Optional[str] = None
    """The patch-embedding stem this source goes through: '' = the main one (``patch_embed``,
    model.in_chans), else a key of model.stems. Left out, it is named when the config loads: '' for a
    source of data.modality, else the source's modality (which model.stems must then have)."""


@dataclass
class RetryConfig:
    """How a transient error reading a remote shard (http(s), s3, gs: connection refused or reset, timeout,
    5xx, 429, SlowDown) is retried before the rest of the shard is skipped and counted."""

    attempts: int = 10
    """Retries per failure (counted again from 0 once a sample got through); 0 = none."""
    initial_s: float = 1.0
    """Wait before the first retry; doubled for each next one, up to max_s, each drawn from [0.5, 1] x that."""
    max_s: float = 30.0
    """Longest wait between two tries (10 retries with the defaults: about 1.5 to 3 minutes of outage)."""


@dataclass
class DataConfig:
    """Where the shards are and how they stream."""

    shards: str = "runs/demo_shards"
    """Shard URL(s): a brace pattern, a comma-separated list, or a folder/URL holding manifest.json."""
    modality: str = "xray"
    """Modality of the main stem (patch_embed, model.in_chans) and, in the short form, of the one source:
    xray, pathology (RGB tiles), ct (volumes) or video (clips)."""
    batch_size: int = 8
    """Micro-batch per process."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = read in the training process)."""
    reuse_batch_memory: bool = True
    """Workers stack batches into shared-memory buffers that they reuse once the training process has
    let go of them, instead of fresh shared memory per batch (data_pipeline/batch_memory.py)."""
    pin_memory: bool = True
    """With a CUDA device: page-lock each reused batch buffer once (cudaHostRegister), so batches cross
    to the GPU by asynchronous DMA; the training process keeps a batch's buffers until its copies are done."""
    decode_device: str = "cpu"
    """Where pathology JPEG tiles are decoded: cpu (the loader workers decode and make the views) or cuda
    (workers draw the views' random choices and pass the encoded bytes; the training process decodes the
    batch with nvjpeg and makes the same views on the GPU, equal to cpu's within the decoders' rounding;
    data_pipeline/device_decode.py). Without a GPU cuda warns once and uses cpu. Other modalities always
    decode in the workers (video: PyAV)."""
    shuffle_buffer: int = 64
    """Samples held in the shuffle buffer (0 = no shuffling within shards)."""
    shuffle_shards: bool = True
    """Shuffle the shard order each pass."""
    split_by: str = "shard"
    """shard: each reader gets its own shards. sample: every reader reads all shards and keeps
    every n-th sample (for datasets with fewer shards than readers; world-size independent)."""
    on_error: str = "skip"
    """What a bad sample or shard does: skip (log, count in the stream's cursor and in the step metrics, go
    on) or raise (stop at the first one, naming the file: for checking a new dataset)."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries of transient remote-read errors (data_pipeline/retry.py)."""
    transforms: TransformConfig = field(default_factory=TransformConfig)
    """Augmentations and normalisation."""
    ct: CTConfig = field(default_factory=CTConfig)
    """CT resampling, windows and slab / crop settings (modality ct)."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Frame sampling (modality video)."""
    sources: List[SourceConfig] = field(default_factory=list)
    """The sources, mixed by weight, one source per batch. A run of one source may give it the short way
    (data.shards, data.modality, data.transforms, data.ct, data.video): loading the config turns that into
    the one source, named after its modality (:meth:`resolve_sources`); from then on only this list is read."""

    def _short_source(self) -> SourceConfig:
        return SourceConfig(name=self.modality, shards=self.shards, modality=self.modality, stem="",
                            transforms=self.transforms, ct=self.ct, video=self.video)

    def in_short_form(self) -> "DataConfig":
        """This config with a lone source that the short form expands to written back as the short form
        (``sources: []``), so that a saved config rerun with ``data.shards=...`` reads those shards."""
        if len(self.sources) == 1 and self.sources[0] == self._short_source():
            return dataclasses.replace(self, sources=[])
        return self

    def resolve_sources(self, stems: Dict[str, int]) -> None:
        """Expand the short form into ``sources`` (when it is empty) and name every source's stem, in place:
        what loading the config does, once. ``stems``: model.stems.

        Raises:
            ConfigError: a source whose modality has no stem, or a stem that model.stems lacks.
        """
        if not self.sources:
            self.sources = [self._short_source()]
        elif self.shards != DataConfig.shards and self.shards not in {source.shards for source in self.sources}:
            raise ConfigError(f"data.shards={self.shards} would be ignored: data.sources is given, so each source's "
                              "shards are read (set data.sources[i].shards, or data.sources=[] for the short form)")
        for index, source in enumerate(self.sources):
            where = f"data.sources[{index}] ({source.name})"
            if source.stem is None:
                if source.modality != self.modality and source.modality not in stems:
                    raise ConfigError(f"{where}: modality {source.modality} needs a stem: set model.stems."
                                      f"{source.modality}=<channels> (data.modality={self.modality} uses "
                                      "model.in_chans)")
                source.stem = "" if source.modality == self.modality else source.modality
            elif source.stem and source.stem not in stems:
                raise ConfigError(f"{where}: stem {source.stem!r} is not one of model.stems {sorted(stems)}")
