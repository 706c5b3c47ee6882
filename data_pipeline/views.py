"""Objective data specs -> views: one augmented view, or DINOv2's global + local crops.

A view object turns one decoded image ``[C, H, W]`` in [0, 1] and the sample's
generator into the named tensors the objective asked for (its ``DataSpec``); the
pipeline stacks each name into the batch.
"""
from __future__ import annotations

import torch

from data_pipeline.photometric import colour_mode, photometric
from data_pipeline.transforms_2d import SingleView


class MultiCropView(SingleView):
    """Two global crops and N local crops with the DINOv2 augmentations.

    Global crop 1 is always blurred (``blur_probability[0]``), global crop 2 rarely
    (``blur_probability[1]``) and may be solarised; local crops are blurred with
    ``blur_probability[2]``. Colour handling follows :func:`colour_mode` for the modality.

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

    def __call__(self, image: torch.Tensor, gen: torch.Generator, where: str) -> dict:
        """image: [C, H, W] in [0, 1] -> {'global_crops': [2, C, S, S], 'local_crops': [N, C, s, s]}."""
        spec, cfg = self.spec, self.photometric
        image = self.match_channels(image, where)
        blur = list(cfg.blur_probability)
        global_crops = []
        for index in range(2):
            view = self.crop(image, spec.img_size, spec.global_scale, gen)
            view = photometric(view, self.mode, cfg, blur[index], cfg.solarize_probability if index else 0.0, gen)
            global_crops.append(self.normalise(view))
        local_crops = [
            self.normalise(photometric(self.crop(image, spec.local_size, spec.local_scale, gen), self.mode, cfg,
                                       blur[2], 0.0, gen))
            for _ in range(spec.local_crops)
        ]
        empty = torch.zeros(0, spec.in_chans, spec.local_size, spec.local_size)
        return {"global_crops": torch.stack(global_crops),
                "local_crops": torch.stack(local_crops) if local_crops else empty}


def build_view(spec, transforms, modality: str):
    """The view producing what ``spec`` asks for."""
    if spec.kind == "single":
        return SingleView(spec.img_size, spec.in_chans, transforms)
    if spec.kind == "multicrop":
        return MultiCropView(spec, transforms, modality)
    raise ValueError(f"data spec kind {spec.kind!r} is not one of ['single', 'multicrop']")
