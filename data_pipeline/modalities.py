"""Modality preparers: one raw WebDataset sample + its seed -> the tensors of the objective's views.

Preparing a sample is the stream's ``prepare`` stage: decode its fields (``data_pipeline.decoders``),
take the modality's input from them (an image, a CT slab or crop, video frames), make the views
(``data_pipeline.views``) and draw the objective's per-sample masks. It returns tensors and knows
nothing of batches. Every preparer draws all its random choices (crop, slab level, frame numbers, jitter) from a
``torch.Generator`` seeded with the sample's seed, so a replayed stream reproduces them.
:meth:`ModalityPreparer.evaluate` is the same decoding with centred choices and no augmentation
(``gen`` None), for labelled evaluation sets.

=========  =====================  ==========================================================
modality   stored fields          becomes
=========  =====================  ==========================================================
xray       png (16-bit) + json    [C, H, W] in [0, 1] -> 2D view
pathology  jpg / png + json       [3, H, W] in [0, 1] -> 2D view (stain jitter under DINOv2)
ct         npy (int16 HU) + json  2D objectives: a 2.5D slab [windows x slices, H', W'] -> 2D view;
                                  volume objectives: a 3D crop [windows, D, S, S]
video      mp4 + json             clip objectives: [T, 3, H, W] frames -> one crop for all frames
=========  =====================  ==========================================================
"""
from __future__ import annotations

import numpy as np
import torch

from data_pipeline.decoders import IMAGE_FIELDS, decode_image, decode_json, decode_sample, image_of
from data_pipeline.device_decode import ENCODED, Encoded, read_header
from data_pipeline.errors import BadInputError
from data_pipeline.masks import MASK_FIELD, VOLUME_MASK_FIELD, evaluation_mask
from data_pipeline.transforms_2d import to_unit_tensor
from data_pipeline.video_io import decode_frames, frame_indices
from data_pipeline.views import build_view
from data_pipeline.volume import VolumeSampler

SPEC_KINDS = {
    "xray": ("single", "multicrop"),
    "pathology": ("single", "multicrop"),
    "ct": ("single", "multicrop", "volume"),
    "video": ("clip",),
}
"""The view kinds each modality can produce."""


def _where(raw: dict) -> str:
    return f"{raw.get('__url__')}:{raw.get('__key__')}"


class ModalityPreparer:
    """Base: seeds the generator, runs :meth:`source` (the modality's part), then the view, then the
    objective's per-sample masks (``masks``: seed -> {name: tensor}, from its DataSpec)."""

    masks = None

    def __init__(self, view):
        self.view = view

    def source(self, raw: dict, gen: torch.Generator, where: str) -> torch.Tensor:
        """The modality's input to the view (an image, a slab, a crop, frames)."""
        raise NotImplementedError

    def __call__(self, raw: dict, seed: int) -> dict:
        """The sample's views by name, its masks, seed and key."""
        where = _where(raw)
        gen = torch.Generator().manual_seed(seed)
        views = self.view(self.source(raw, gen, where), gen, where)
        masks = self.masks(seed) if self.masks is not None else {}
        return {**views, **masks, "seed": seed, "key": raw["__key__"]}

    def evaluate(self, raw: dict) -> torch.Tensor:
        """The deterministic input of one sample for evaluation (probes, export checks): no augmentation,
        centred choices (the middle CT level or crop, the middle frames), the whole image or frames
        resized; the one tensor the encoder takes (``[C, S, S]``, ``[C, D, S, S]`` or ``[C, T, S, S]``).

        Raises:
            BadInputError: the sample cannot be decoded.
        """
        where = _where(raw)
        return self.view.evaluate(self.source(raw, None, where), where)

    def evaluate_mask(self, raw: dict) -> torch.Tensor:
        """The sample's segmentation mask (``seg.png``) as :meth:`evaluate` views its image: int64 ``[S, S]``.

        Raises:
            BadInputError: this modality's sets carry no masks (video), or the mask cannot be decoded.
        """
        raise BadInputError(_where(raw), f"{type(self).__name__}: segmentation masks are read beside images and "
                                         "CT volumes only")


class ImagePreparer(ModalityPreparer):
    """2D images (X-ray 16-bit PNG, pathology JPEG/PNG tile) -> [C, H, W] in [0, 1]."""

    def source(self, raw, gen, where):
        return to_unit_tensor(image_of(decode_sample(raw), where), where)

    def evaluate_mask(self, raw: dict) -> torch.Tensor:  # noqa: D102 - the base class says it
        try:
            mask = decode_image(raw[MASK_FIELD])
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad field
            raise BadInputError(_where(raw), f"cannot decode .{MASK_FIELD}: {exc}") from None
        if mask.ndim != 2:
            raise BadInputError(_where(raw), f".{MASK_FIELD} is not a single-channel mask: {mask.shape}")
        return evaluation_mask(mask, self.view.size)


class EncodedImagePreparer(ImagePreparer):
    """The device path's preparer of 2D images (``data.decode_device=cuda``, :mod:`data_pipeline.device_decode`):
    the image stays encoded; its header gives the size, from which the view's choices are drawn with the
    generator and order of the CPU path; the other fields are decoded as there. :meth:`evaluate` is the CPU
    path's."""

    def __call__(self, raw: dict, seed: int) -> dict:
        """The sample's encoded image with its drawn choices (:data:`ENCODED`), its masks, seed and key."""
        where = _where(raw)
        field = next((name for name in IMAGE_FIELDS if name in raw), None)
        if field is None:
            raise BadInputError(where, "sample has no .png/.jpg/.npy image")
        decode_sample({name: value for name, value in raw.items() if name not in IMAGE_FIELDS})
        data = bytes(raw[field])
        channels, height, width, on_device = read_header(data, where)
        self.view.match_channels(torch.empty(channels, 0, 0), where)  # the CPU path's channel check
        choices = self.view.draw((channels, height, width), torch.Generator().manual_seed(seed))
        masks = self.masks(seed) if self.masks is not None else {}
        return {ENCODED: Encoded(data, on_device, choices, where), **masks, "seed": seed, "key": raw["__key__"]}


class CTPreparer(ModalityPreparer):
    """CT volumes -> a windowed 2.5D slab (2D views) or 3D crop (volume view)."""

    def __init__(self, view, spec, ct_cfg):
        super().__init__(view)
        self.sampler = VolumeSampler(ct_cfg)
        self.spec = spec
        channels = len(self.sampler.windows) if spec.kind == "volume" else self.sampler.slab_channels
        if channels != spec.in_chans:
            made = "windows" if spec.kind == "volume" else "slices x windows"
            raise ValueError(f"CT gives {channels} channel(s) ({made}) but the model takes {spec.in_chans}: "
                             "set data.ct.slices / data.ct.windows or model.in_chans to match")

    def source(self, raw, gen, where):
        sample = decode_sample(raw)
        if "npy" not in sample or not isinstance(sample.get("json"), dict):
            raise BadInputError(where, "a CT sample needs .npy (HU volume) and .json (spacing) fields")
        volume, meta = sample["npy"], sample["json"]
        if self.spec.kind == "volume":
            size = (self.spec.depth, self.spec.img_size, self.spec.img_size)
            return self.sampler.crop(volume, meta, size, gen, where)
        return self.sampler.slab(volume, meta, gen, where)

    def evaluate_mask(self, raw: dict) -> torch.Tensor:
        """The scan's label volume (``seg.npy``) as :meth:`evaluate` views the scan: int64 ``[d, S, S]`` of the
        centred crop (a volume view), or ``[S, S]`` of the middle slice (a 2.5D slab, resized as its image)."""
        where = _where(raw)
        sample = decode_sample({name: value for name, value in raw.items()
                                if name in (VOLUME_MASK_FIELD, "json") or name.startswith("__")})
        labels, meta = sample.get(VOLUME_MASK_FIELD), sample.get("json")
        if not isinstance(labels, np.ndarray) or not isinstance(meta, dict) or labels.dtype != np.uint8:
            raise BadInputError(where, f"a CT mask needs a uint8 .{VOLUME_MASK_FIELD} beside the .json metadata")
        if self.spec.kind == "volume":
            return self.sampler.labels(labels, meta, (self.spec.depth, self.spec.img_size, self.spec.img_size), where)
        return evaluation_mask(self.sampler.labels(labels, meta, None, where).numpy(), self.view.size)


class VideoPreparer(ModalityPreparer):
    """Video clips -> ``spec.frames`` frames [T, 3, H, W] in [0, 1], picked by ``data.video``."""

    def __init__(self, view, spec, video_cfg):
        super().__init__(view)
        self.frames = spec.frames
        self.sampling = video_cfg.sampling
        self.stride = video_cfg.stride

    def source(self, raw, gen, where):
        data = raw.get("mp4")
        if data is None:
            raise BadInputError(where, "a video sample needs an .mp4 field")
        meta = decode_json(raw["json"]) if "json" in raw else None
        total = meta.get("frames") if isinstance(meta, dict) else None
        if not isinstance(total, int) or total < 1:
            raise BadInputError(where, f"metadata 'frames' must be a positive integer, got {total!r}")
        indices = frame_indices(total, self.frames, self.stride, self.sampling, gen)
        frames = torch.from_numpy(decode_frames(data, indices, where))
        return frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def build_preparer(data_cfg, spec, encoded: bool = False):
    """The modality preparer producing the views an objective's DataSpec asks for; ``encoded``: a 2D image
    source's preparer of the device path (:class:`EncodedImagePreparer`: images stay encoded, views are made
    on the training device).

    Raises:
        ValueError: the modality cannot produce that kind of view, or the channels do not match.
    """
    modality = data_cfg.modality
    if modality not in SPEC_KINDS:
        raise ValueError(f"unknown data.modality {modality!r}")
    if spec.kind not in SPEC_KINDS[modality]:
        raise ValueError(f"data.modality={modality} cannot feed an objective that asks for {spec.kind!r} views "
                         f"({modality} gives {list(SPEC_KINDS[modality])})")
    view = build_view(spec, data_cfg.transforms, modality)
    if modality == "ct":
        preparer = CTPreparer(view, spec, data_cfg.ct)
    elif modality == "video":
        preparer = VideoPreparer(view, spec, data_cfg.video)
    else:
        preparer = EncodedImagePreparer(view) if encoded else ImagePreparer(view)
    preparer.masks = getattr(spec, "masks", None)
    return preparer
