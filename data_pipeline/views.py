"""Objective data specs -> views: one augmented view, DINOv2's global + local crops, a 3D crop, a clip.

A view object turns one modality input in [0, 1] (an image ``[C, H, W]``, a windowed
volume crop ``[C, D, S, S]``, frames ``[T, C, H, W]``) and the sample's generator into the
named tensors the objective asked for (its ``DataSpec``); the stream's batching stage stacks
each name into the batch. Views return tensors and know nothing of batches.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms.v2 import functional as TF

from data_pipeline.errors import BadInputError
from data_pipeline.photometric import apply_ops, colour_mode, draw_photometric
from data_pipeline.transforms_2d import SingleView, apply_crop, normalised


class MultiCropView(SingleView):
    """Two global crops and N local crops with the DINOv2 augmentations.

    Global crop 1 is always blurred (``blur_probability[0]``), global crop 2 rarely
    (``blur_probability[1]``) and may be solarised; local crops are blurred with
    ``blur_probability[2]``. Colour handling follows :func:`colour_mode` for the modality. Where the
    spec asks for Gram-teacher crops (``gram_size``), each global crop's box and flips are cut again at
    that side without the photometric steps (DINOv3's undistorted Gram-teacher crops): no random draw of
    their own, so the other crops are those drawn without them.

    Args:
        spec: the objective's DataSpec (kind multicrop).
        cfg: :class:`pretrain.config.TransformConfig`-like (crop_ratio, hflip, mean, std, photometric).
        modality: the data modality (decides the colour augmentation under ``auto``).
    """

    def __init__(self, spec, cfg, modality: str):
        super().__init__(spec.img_size, spec.in_chans, cfg)
        self.spec = spec
        self.photometric = cfg.photometric
        self.mode = colour_mode(cfg.photometric.colour, modality, spec.in_chans)

    def draw(self, shape: Sequence[int], gen: torch.Generator) -> dict:
        """The random choices of every crop for an image of ``shape`` ``[C, H, W]``, drawn in the order the
        crops are made: {'global_crops': [(Crop, colour steps)] x 2, 'local_crops': [...] x N}."""
        spec, cfg = self.spec, self.photometric
        height, width, blur = shape[-2], shape[-1], list(cfg.blur_probability)
        choices: dict = {"global_crops": [], "local_crops": []}
        for index in range(2):
            crop = self.draw_crop(height, width, spec.img_size, spec.global_scale, gen)
            ops = draw_photometric(self.mode, cfg, blur[index], cfg.solarize_probability if index else 0.0, gen)
            choices["global_crops"].append((crop, ops))
        for _ in range(spec.local_crops):
            crop = self.draw_crop(height, width, spec.local_size, spec.local_scale, gen)
            choices["local_crops"].append((crop, draw_photometric(self.mode, cfg, blur[2], 0.0, gen)))
        if spec.gram_size:
            choices["gram_crops"] = [(crop._replace(size=spec.gram_size), []) for crop, _ in choices["global_crops"]]
        return choices

    def apply(self, image: torch.Tensor, choices: dict) -> dict:
        """The crops of ``image`` (channels matched, on any device) for choices from :meth:`draw`, normalised:
        {'global_crops': [2, C, S, S], 'local_crops': [N, C, s, s]} (and 'gram_crops': [2, C, S', S'] where the
        spec has ``gram_size``) on the image's device."""
        spec, device = self.spec, image.device
        crops = {"global_crops": torch.empty(2, spec.in_chans, spec.img_size, spec.img_size, device=device),
                 "local_crops": torch.empty(spec.local_crops, spec.in_chans, spec.local_size, spec.local_size,
                                            device=device)}
        if spec.gram_size:
            crops["gram_crops"] = torch.empty(2, spec.in_chans, spec.gram_size, spec.gram_size, device=device)
        for name, drawn in choices.items():
            for index, (crop, ops) in enumerate(drawn):
                self.normalise(apply_ops(apply_crop(image, crop), ops), crops[name][index])
        return crops

    def __call__(self, image: torch.Tensor, gen: torch.Generator, where: str) -> dict:
        """image: [C, H, W] in [0, 1] -> {'global_crops': [2, C, S, S], 'local_crops': [N, C, s, s]}, normalised."""
        image = self.match_channels(image, where)
        return self.apply(image, self.draw(image.shape, gen))


class VolumeView(SingleView):
    """A 3D crop (already windowed to [0, 1] by the volume sampler) normalised per channel -> {'volume'}."""

    def __call__(self, volume: torch.Tensor, gen: torch.Generator, where: str) -> dict:
        """volume: [C, D, S, S] in [0, 1] -> {'volume': [C, D, S, S] normalised}."""
        return {"volume": self.evaluate(volume, where)}

    def evaluate(self, volume: torch.Tensor, where: str) -> torch.Tensor:
        """The crop is already deterministic (centred by the sampler): only checked and normalised."""
        if volume.shape[0] != self.in_chans:
            raise BadInputError(where, f"{volume.shape[0]}-channel volume for a {self.in_chans}-channel model")
        return normalised(volume, self.mean[..., None], self.std[..., None])


class ClipView(SingleView):
    """Video frames -> one random resized crop (and flip) shared by all frames, normalised -> {'clip'}."""

    def _channels(self, frames: torch.Tensor, where: str) -> torch.Tensor:
        if self.in_chans == 1:
            return frames.mean(dim=1, keepdim=True)
        if frames.shape[1] != self.in_chans:
            raise BadInputError(where, f"{frames.shape[1]}-channel frames for a {self.in_chans}-channel model")
        return frames

    def __call__(self, frames: torch.Tensor, gen: torch.Generator, where: str) -> dict:
        """frames: [T, 3, H, W] in [0, 1] -> {'clip': [C, T, S, S] normalised}: a channels-first view of the
        frames-first crop (the batching stage's copy into its row makes the layout; no copy here)."""
        clip = self.crop(self._channels(frames, where), self.size, self.scale, gen)
        return {"clip": self.normalise(clip).transpose(0, 1)}

    def evaluate(self, frames: torch.Tensor, where: str) -> torch.Tensor:
        """frames: [T, 3, H, W] in [0, 1] -> whole frames resized to S x S, normalised, [C, T, S, S]."""
        clip = TF.resize(self._channels(frames, where), [self.size, self.size], antialias=True)
        return self.normalise(clip).transpose(0, 1).contiguous()


VIEWS = {"single": SingleView, "volume": VolumeView, "clip": ClipView}


def build_view(spec, transforms, modality: str):
    """The view producing what ``spec`` asks for."""
    if spec.kind == "multicrop":
        return MultiCropView(spec, transforms, modality)
    if spec.kind in VIEWS:
        return VIEWS[spec.kind](spec.img_size, spec.in_chans, transforms)
    raise ValueError(f"data spec kind {spec.kind!r} is not one of {sorted(VIEWS) + ['multicrop']}")
