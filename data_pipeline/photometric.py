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


def intensity_jitter(image: torch.Tensor, brightness: float, contrast: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness then contrast, each by a factor drawn from [1 - x, 1 + x]."""
    image = TF.adjust_brightness(image, uniform(gen, max(0.0, 1 - brightness), 1 + brightness))
    return TF.adjust_contrast(image, uniform(gen, max(0.0, 1 - contrast), 1 + contrast)).clamp(0, 1)


def rgb_jitter(image: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter in a random order (torchvision's ColorJitter)."""
    factors = [
        (TF.adjust_brightness, uniform(gen, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
        (TF.adjust_contrast, uniform(gen, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
        (TF.adjust_saturation, uniform(gen, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
        (TF.adjust_hue, uniform(gen, -cfg.hue, cfg.hue)),
    ]
    for index in torch.randperm(4, generator=gen).tolist():
        adjust, factor = factors[index]
        image = adjust(image, factor)
    return image.clamp(0, 1)


def stain_jitter(image: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """H&E stain augmentation (Tellez et al.): perturb each stain's optical density.

    RGB -> optical density -> (H, E, D) by colour deconvolution; each stain channel becomes
    ``s * alpha + beta`` with alpha in [1 - sigma, 1 + sigma] and beta in [-sigma, sigma];
    then back to RGB.

    Args:
        image: [3, H, W] RGB in [0, 1].
    """
    alpha = 1 - sigma + 2 * sigma * torch.rand(3, generator=gen)
    beta = -sigma + 2 * sigma * torch.rand(3, generator=gen)
    od = -torch.log(image.clamp(min=1 / 255)).permute(1, 2, 0)  # [H, W, 3]
    stains = od @ _RGB_OD_TO_HED
    od = (stains * alpha + beta) @ _HED_TO_RGB_OD
    return torch.exp(-od).permute(2, 0, 1).clamp(0, 1)


def gaussian_blur(image: torch.Tensor, sigma_range, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur with sigma drawn from ``sigma_range`` (kernel covering +- 3 sigma)."""
    sigma = uniform(gen, sigma_range[0], sigma_range[1])
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def solarize(image: torch.Tensor) -> torch.Tensor:
    """Invert the pixels above 0.5."""
    return torch.where(image >= 0.5, 1.0 - image, image)


def photometric(image: torch.Tensor, mode: str, cfg, blur_probability: float, solarize_probability: float,
                gen: torch.Generator) -> torch.Tensor:
    """The colour/intensity part of a DINOv2 view: jitter, grayscale, blur, solarisation.

    Args:
        image: [C, H, W] in [0, 1].
        mode: intensity | rgb | stain | none (see :func:`colour_mode`).
        cfg: :class:`pretrain.config.PhotometricConfig`-like.
        blur_probability, solarize_probability: this view's probabilities.
        gen: the sample's generator.
    """
    jitter = chance(gen, cfg.jitter_probability)
    if mode == "intensity" and jitter:
        image = intensity_jitter(image, cfg.brightness, cfg.contrast, gen)
    elif mode == "rgb":
        if jitter:
            image = rgb_jitter(image, cfg, gen)
        if chance(gen, cfg.grayscale_probability):
            image = TF.rgb_to_grayscale(image, num_output_channels=image.shape[0])
    elif mode == "stain" and jitter:
        image = intensity_jitter(stain_jitter(image, cfg.stain_sigma, gen), cfg.brightness, cfg.contrast, gen)
    if chance(gen, blur_probability):
        image = gaussian_blur(image, cfg.blur_sigma, gen)
    if chance(gen, solarize_probability):
        image = solarize(image)
    return image
