"""Masked autoencoder (MAE): encode the visible patches, reconstruct the masked ones.

The encoder sees only ``(1 - mask_ratio)`` of the patches; a light decoder fills in
mask tokens and predicts pixels; the loss is the mean squared error on masked
patches only, against targets normalised per patch. Works for any channel count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pretrain.errors import ConfigError
from pretrain.models.patch_embed import patchify, unpatchify
from pretrain.models.pos_embed import sincos_2d
from pretrain.models.blocks import Block, init_weights
from pretrain.backbone import build_vit
from pretrain.models.vit import VIT_PRESETS, VisionTransformer
from pretrain.objectives.base import (Activation, DataSpec, Objective, ObjectiveOutput, TrunkPass,
                                     embed_every_stem, register, zero_touch)
from pretrain.objectives.hiend import DecoderSettings, HierarchicalLayers, decoder_taps, trunk_with_taps
from pretrain.objectives.masking import PerSample, gather_tokens, mae_noise, random_masking


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error over masked patches.

    Args:
        pred, target: [B, L, P] predicted and true patch pixels.
        mask: [B, L], 1 where the patch was masked.
        norm_pix: normalise each target patch by its own mean and variance.
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def visible_count(patches: int, mask_ratio: float) -> int:
    """Patches MAE keeps visible: ``int(patches * (1 - mask_ratio))`` (the reference truncates), at least 1."""
    return max(1, int(patches * (1 - mask_ratio)))


class LightDecoder(nn.Module):
    """An encoder and the light decoder of masked autoencoders (MAE, VideoMAE): its input projection, mask
    token, fixed positions (``positions`` [N, decoder_dim]), blocks, norm and pixel head (``pixels`` wide); with
    ``decoder_layers`` (the encoder depths it reads), Hi-End-MAE's cross-attention blocks after the blocks."""

    def __init__(self, encoder: VisionTransformer, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 norm_pix_loss: bool, positions: torch.Tensor, pixels: int,
                 decoder_layers: Optional[Sequence[int]] = None):
        super().__init__()
        self.encoder = encoder
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", positions[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, encoder.mlp_ratio, attn_backend=encoder.blocks[0].attn.backend)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, pixels)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            part.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        self.hierarchy = HierarchicalLayers(decoder_layers, encoder.embed_dim, decoder_dim, decoder_heads,
                                            encoder.mlp_ratio, encoder.blocks[0].attn.backend) if decoder_layers else None

    def encode(self, visible: torch.Tensor) -> tuple:
        """Visible tokens with positions [B, K, D] -> (latent [B, 1 + R + K, D], {depth: the tokens after that
        block} for the hierarchical decoder, {} for the light one)."""
        if self.hierarchy is None:
            return self.encoder.forward_tokens(visible), {}
        return trunk_with_taps(self.encoder, visible, self.hierarchy.taps)

    def cross(self, x: torch.Tensor, hidden: dict) -> torch.Tensor:
        """The decoder's tokens after its blocks, through the cross-attention blocks (the hierarchical decoder)."""
        return x if self.hierarchy is None else self.hierarchy(x, hidden)


class MAEModel(LightDecoder):
    """Encoder + light decoder (or Hi-End-MAE's hierarchical one: ``decoder_layers``, the encoder depths it reads).
    forward(images, noise) -> (loss, pred, mask)."""

    def __init__(self, encoder: VisionTransformer, mask_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, norm_pix_loss: bool, decoder_layers: Optional[Sequence[int]] = None):
        super().__init__(encoder, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss,
                         sincos_2d(decoder_dim, *encoder.grid), encoder.patch_size ** 2 * encoder.in_chans,
                         decoder_layers)
        self.mask_ratio = mask_ratio
        stems = encoder.stems or {}
        self.decoder_preds = nn.ModuleDict({  # one pixel head per extra stem (its channel count)
            name: nn.Linear(decoder_dim, encoder.patch_size ** 2 * stem.in_chans) for name, stem in stems.items()
        }) if stems else None
        if self.decoder_preds is not None:
            self.decoder_preds.apply(init_weights)

    def kept(self, patches: int) -> int:
        """How many of ``patches`` stay visible to the encoder: ``int(patches * (1 - mask_ratio))``, truncated
        as MAE's random_masking does (at least 1)."""
        return visible_count(patches, self.mask_ratio)

    def visible_tokens(self, images: torch.Tensor, noise: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """Encode the visible patches.

        Args:
            images: [B, C, H, W] at the configured size.
            noise: [B, L] masking noise.
            stem: the encoder stem (modality) of these images.

        Returns:
            latent [B, 1 + R + K, D], ids_restore [B, L], mask [B, L].
        """
        latent, _, ids_restore, mask = self.encode_visible(images, noise, stem)
        return latent, ids_restore, mask

    def encode_visible(self, images: torch.Tensor, noise: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """:meth:`visible_tokens` and what a hierarchical decoder reads: (latent, {depth: the visible tokens
        after that block} ({} for the light decoder), ids_restore, mask)."""
        tokens = embed_every_stem(self.encoder, images, stem=stem)
        ids_keep, ids_restore, mask = random_masking(noise, self.kept(tokens.shape[1]))
        latent, hidden = self.encode(gather_tokens(tokens, ids_keep))
        return latent, hidden, ids_restore, mask

    def pixel_head(self, stem: Optional[str] = None) -> nn.Linear:
        """The pixel prediction head of a stem (``decoder_pred`` for the main one, None or '')."""
        if stem:
            return self.decoder_preds[stem]
        return self.decoder_pred

    def decoder_hidden(self, latent: torch.Tensor, ids_restore: torch.Tensor, blocks: Optional[int] = None
                       ) -> torch.Tensor:
        """latent: [B, 1 + R + K, D] -> the decoder's tokens [B, 1 + R + L, decoder_dim] after its first
        ``blocks`` blocks (None: all), before its norm: visible tokens and mask tokens in patch order."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        visible = x[:, prefix:]
        fill = self.mask_token.to(x.dtype).expand(x.shape[0], ids_restore.shape[1] - visible.shape[1], -1)
        patches = gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)
        x = torch.cat([x[:, :prefix], patches + self.decoder_pos_embed.to(x.dtype)], dim=1)
        for block in self.decoder_blocks[:blocks]:
            x = block(x)
        return x

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, stem: Optional[str] = None,
               hidden: Optional[dict] = None) -> torch.Tensor:
        """latent: [B, 1 + R + K, D] -> predicted patches [B, L, p*p*C] (C of the stem); ``hidden``: the shallower
        encoder depths a hierarchical decoder cross-attends to."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_norm(self.cross(self.decoder_hidden(latent, ids_restore), hidden))
        head = self.pixel_head(stem)
        pred = head(x)[:, prefix:]
        if self.decoder_preds is not None and self.training and torch.is_grad_enabled():
            others = [h for h in [self.decoder_pred, *self.decoder_preds.values()] if h is not head]
            pred = pred + zero_touch(others, lambda h: x[:1, :1])
        return pred

    def forward(self, images: torch.Tensor, noise: torch.Tensor, stem: Optional[str] = None) -> tuple:
        """images: [B, C, H, W], noise: [B, L] -> (loss, pred [B, L, p*p*C], mask [B, L])."""
        latent, hidden, ids_restore, mask = self.encode_visible(images, noise, stem)
        pred = self.decode(latent, ids_restore, stem, hidden)
        target = patchify(images, self.encoder.patch_size)
        return masked_patch_loss(pred, target, mask, self.norm_pix_loss), pred, mask


class DecoderShape:
    """A masked-autoencoder decoder (``decoder_embed`` + ``decoder_blocks``) described like a trunk for the planner."""

    def __init__(self, model: nn.Module):
        block = model.decoder_blocks[0]
        self.embed_dim = model.decoder_embed.out_features
        hierarchy = getattr(model, "hierarchy", None)  # a cross-attention block counted as one more block
        self.depth = len(model.decoder_blocks) + (len(hierarchy.cross_blocks) if hierarchy is not None else 0)
        self.num_heads = block.attn.num_heads
        self.mlp_ratio = block.mlp.fc1.out_features / self.embed_dim


@dataclass
class MAEConfig(DecoderSettings):
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

    def validate(self, cfg) -> None:
        """Some patches hidden, some visible; the hierarchical decoder's depths inside the encoder."""
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mae.mask_ratio={self.mask_ratio} must be in (0, 1)")
        decoder_taps(self, cfg.model.depth or VIT_PRESETS[cfg.model.size][1], "objective.mae")


@register("mae", settings=MAEConfig)
class MAEObjective(Objective):
    """MAE on single augmented views; masks are drawn from each sample's seed."""

    def __init__(self, cfg):
        self.cfg = cfg
        mae = cfg.objective.mae
        encoder = build_vit(cfg.model)
        self.model = MAEModel(encoder, mae.mask_ratio, mae.decoder_dim, mae.decoder_depth, mae.decoder_heads,
                              mae.norm_pix_loss, decoder_taps(mae, len(encoder.blocks), "objective.mae"))

    def data_spec(self) -> DataSpec:
        return DataSpec(kind="single", img_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans,
                        masks=PerSample(mae_noise, patches=self.model.encoder.num_patches))

    def trainable(self) -> nn.Module:
        return self.model

    def encoder(self) -> nn.Module:
        return self.model.encoder

    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        images = batch["image"]
        noise = batch.get("mae_noise")  # drawn in the DataLoader workers; drawn here for a batch without it
        if noise is None:
            noise = mae_noise(batch["seed"], self.model.encoder.num_patches)["mae_noise"].to(images.device)
        loss, pred, mask = model(images, noise, batch.get("stem"))
        visible = self.model.kept(noise.shape[1])
        return ObjectiveOutput(
            loss=loss,
            metrics={"visible_tokens": float(visible), "mask_ratio": mask.detach().float().mean()},
            visuals={"pred": pred.detach(), "mask": mask.detach()},
        )

    def token_passes(self) -> List[TrunkPass]:
        """Encoder on the visible patches, decoder on all of them (plus their inputs and outputs)."""
        enc, model = self.model.encoder, self.model
        prefix, patches = enc.num_prefix_tokens, enc.num_patches
        visible = visible_count(patches, model.mask_ratio)
        width = model.decoder_embed.out_features
        return [
            TrunkPass("encoder (visible patches)", enc, prefix + visible, 1, activations=[
                Activation("input image", 1, enc.in_chans * enc.img_size ** 2),
                Activation("patch tokens before masking", patches, enc.embed_dim),
                Activation("final norm and decoder embedding inputs", prefix + visible, enc.embed_dim, 2)]),
            TrunkPass("decoder (all patches)", DecoderShape(model), prefix + patches, 1, activations=[
                Activation("decoder norm and pixel head inputs", prefix + patches, width, 2),
                Activation("loss: prediction, target, error", patches, enc.patch_size ** 2 * enc.in_chans, 3,
                           fp32=True)]),
        ]

    def render(self, batch: dict, out: ObjectiveOutput, rows: int = 4) -> Dict[str, np.ndarray]:
        """A grid with one row per sample: input | masked input | reconstruction (visible patches pasted)."""
        enc = self.model.encoder
        images = batch["image"][:rows].detach().float().cpu()
        pred = out.visuals["pred"][:rows].float().cpu()
        mask = out.visuals["mask"][:rows].float().cpu()
        target = patchify(images, enc.patch_size)
        if self.model.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        keep = mask[..., None]
        chans = images.shape[1]
        masked = unpatchify(target * (1 - keep), enc.patch_size, chans, enc.grid)
        recon = unpatchify(pred * keep + target * (1 - keep), enc.patch_size, chans, enc.grid)
        grid = torch.cat([torch.cat([images, masked, recon], dim=3)[i] for i in range(images.shape[0])], dim=1)
        grid = grid[:3] if grid.shape[0] >= 3 else grid[:1]
        low, high = grid.min(), grid.max()
        pixels = ((grid - low) / (high - low + 1e-8) * 255).round().byte()
        array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        return {"reconstruction": array}
