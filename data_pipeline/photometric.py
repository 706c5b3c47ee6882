"""Colour and intensity augmentations of 2D views, driven by an explicit random generator.

All functions take and return float images ``[C, H, W]`` in [0, 1] (before normalisation)
and draw every random number from the ``torch.Generator`` they are given, so a view is
reproducible from its sample's seed. Which colour augmentation a modality gets is
decided by :func:`colour_mode`: 1-channel X-rays and CT only see brightness/contrast
changes (a hue or a grayscale conversion means nothing there), H&E pathology tiles get
a stain jitter in the haematoxylin-eosin-DAB space, other RGB images the DINOv2 colour
jitter and random grayscale.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torchvision.transforms.v2 import functional as TF

COLOUR_BY_MODALITY = {"xray": "intensity", "ct": "intensity", "pathology": "stain"}

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB optical densities in R, G, B).
_HED_TO_RGB_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_TO_RGB_OD = _HED_TO_RGB_OD / _HED_TO_RGB_OD.norm(dim=1, keepdim=True)
_RGB_OD_TO_HED = torch.linalg.inv(_HED_TO_RGB_OD)


def colour_mode(setting: str, modality: str, channels: int) -> str:
    """The colour augmentation for a view: ``setting`` unless it is ``auto``.

    auto: by modality (xray/ct -> intensity, pathology -> stain), else rgb for 3 channels
    and intensity otherwise.
    """
    if setting != "auto":
        return setting
    return COLOUR_BY_MODALITY.get(modality, "rgb" if channels == 3 else "intensity")


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    """One float drawn uniformly from [low, high)."""
    return low + (high - low) * torch.rand(1, generator=gen).item()


def chance(gen: torch.Generator, probability: float) -> bool:
    """True with the given probability (always draws one number, so streams stay aligned)."""
    return torch.rand(1, generator=gen).item() < probability


def adjust(image: torch.Tensor, op: tuple) -> torch.Tensor:
    """One drawn step ``(name, *arguments)`` of a view's colour part applied to ``image`` (on any device)."""
    name, *args = op
    if name == "stain":
        return stain_apply(image, *args)
    if name == "blur":
        kernel = 2 * math.ceil(3 * args[0]) + 1
        return TF.gaussian_blur(image, [kernel, kernel], [args[0], args[0]])
    if name == "grayscale":
        return TF.rgb_to_grayscale(image, num_output_channels=image.shape[0])
    if name == "clamp":
        return image.clamp(0, 1)
    if name == "solarize":
        return solarize(image)
    return ADJUSTMENTS[name](image, *args)


ADJUSTMENTS = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
               "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


def apply_ops(image: torch.Tensor, ops: List[tuple]) -> torch.Tensor:
    """``image`` through the drawn steps in order (what :func:`draw_photometric` and the ``draw_*`` helpers
    return): the same arithmetic whether the view is made in a worker or on the training device."""
    for op in ops:
        image = adjust(image, op)
    return image


def draw_intensity(brightness: float, contrast: float, gen: torch.Generator) -> List[tuple]:
    """Brightness then contrast, each by a factor drawn from [1 - x, 1 + x], then a clamp to [0, 1]."""
    return [("brightness", uniform(gen, max(0.0, 1 - brightness), 1 + brightness)),
            ("contrast", uniform(gen, max(0.0, 1 - contrast), 1 + contrast)), ("clamp",)]


def draw_rgb(cfg, gen: torch.Generator) -> List[tuple]:
    """Brightness, contrast, saturation and hue jitter in a random order (torchvision's ColorJitter)."""
    factors = [
        ("brightness", uniform(gen, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
        ("contrast", uniform(gen, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
        ("saturation", uniform(gen, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
        ("hue", uniform(gen, -cfg.hue, cfg.hue)),
    ]
    return [factors[index] for index in torch.randperm(4, generator=gen).tolist()] + [("clamp",)]


def draw_stain(sigma: float, gen: torch.Generator) -> List[tuple]:
    """The stain step of :func:`stain_jitter`: alpha in [1 - sigma, 1 + sigma], beta in [-sigma, sigma] per stain."""
    alpha = 1 - sigma + 2 * sigma * torch.rand(3, generator=gen)
    beta = -sigma + 2 * sigma * torch.rand(3, generator=gen)
    return [("stain", alpha, beta)]


def intensity_jitter(image: torch.Tensor, brightness: float, contrast: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness then contrast, each by a factor drawn from [1 - x, 1 + x]."""
    return apply_ops(image, draw_intensity(brightness, contrast, gen))


def rgb_jitter(image: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter in a random order (torchvision's ColorJitter)."""
    return apply_ops(image, draw_rgb(cfg, gen))


_STAIN_MATRICES: dict = {}


def _stain_matrices(device: torch.device) -> tuple:
    """(RGB OD -> HED, HED -> RGB OD) on ``device``, copied there once."""
    if device.type == "cpu":
        return _RGB_OD_TO_HED, _HED_TO_RGB_OD
    if str(device) not in _STAIN_MATRICES:
        _STAIN_MATRICES[str(device)] = (_RGB_OD_TO_HED.to(device), _HED_TO_RGB_OD.to(device))
    return _STAIN_MATRICES[str(device)]


def stain_apply(image: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Each stain's optical density ``s * alpha + beta`` (see :func:`stain_jitter`), on ``image``'s device."""
    to_hed, to_rgb = _stain_matrices(image.device)
    od = -torch.log(image.clamp(min=1 / 255)).permute(1, 2, 0)  # [H, W, 3]
    stains = od @ to_hed
    od = (stains * alpha.to(image.device) + beta.to(image.device)) @ to_rgb
    return torch.exp(-od).permute(2, 0, 1).clamp(0, 1)


def stain_jitter(image: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """H&E stain augmentation (Tellez et al.): perturb each stain's optical density.

    RGB -> optical density -> (H, E, D) by colour deconvolution; each stain channel becomes
    ``s * alpha + beta`` with alpha in [1 - sigma, 1 + sigma] and beta in [-sigma, sigma];
    then back to RGB.

    Args:
        image: [3, H, W] RGB in [0, 1].
    """
    return apply_ops(image, draw_stain(sigma, gen))


def gaussian_blur(image: torch.Tensor, sigma_range, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur with sigma drawn from ``sigma_range`` (kernel covering +- 3 sigma)."""
    return adjust(image, ("blur", uniform(gen, sigma_range[0], sigma_range[1])))


def solarize(image: torch.Tensor) -> torch.Tensor:
    """Invert the pixels above 0.5."""
    return torch.where(image >= 0.5, 1.0 - image, image)


def draw_photometric(mode: str, cfg, blur_probability: float, solarize_probability: float,
                     gen: torch.Generator) -> List[tuple]:
    """The random choices of :func:`photometric`, drawn in its order, as steps for :func:`apply_ops`."""
    ops: List[tuple] = []
    jitter = chance(gen, cfg.jitter_probability)
    if mode == "intensity" and jitter:
        ops += draw_intensity(cfg.brightness, cfg.contrast, gen)
    elif mode == "rgb":
        if jitter:
            ops += draw_rgb(cfg, gen)
        if chance(gen, cfg.grayscale_probability):
            ops.append(("grayscale",))
    elif mode == "stain" and jitter:
        ops += draw_stain(cfg.stain_sigma, gen)
        ops += draw_intensity(cfg.brightness, cfg.contrast, gen)
    if chance(gen, blur_probability):
        ops.append(("blur", uniform(gen, cfg.blur_sigma[0], cfg.blur_sigma[1])))
    if chance(gen, solarize_probability):
        ops.append(("solarize",))
    return ops


def photometric(image: torch.Tensor, mode: str, cfg, blur_probability: float, solarize_probability: float,
                gen: torch.Generator) -> torch.Tensor:
    """The colour/intensity part of a DINOv2 view: jitter, grayscale, blur, solarisation.

    Drawing (:func:`draw_photometric`) and applying (:func:`apply_ops`) are separate steps, so that the
    device-decode path (:mod:`data_pipeline.device_decode`) draws in the worker and applies on the GPU.

    Args:
        image: [C, H, W] in [0, 1].
        mode: intensity | rgb | stain | none (see :func:`colour_mode`).
        cfg: :class:`pretrain.config.PhotometricConfig`-like.
        blur_probability, solarize_probability: this view's probabilities.
        gen: the sample's generator.
    """
    return apply_ops(image, draw_photometric(mode, cfg, blur_probability, solarize_probability, gen))
