"""VideoMAE V2 on video clips and CT volumes: tubelet tokens, encoder masking, running-cell decoder masking.

The encoder (the shared ViT trunk with a 3D tubelet stem) sees only the visible tubelets
(about 10%: tube masking for video, random 3D masking for volumes). The decoder gets the
encoder's visible tokens plus a mask token at every position the running-cell pattern keeps
(dual masking: it leaves out ``decoder_mask_ratio`` of all positions, visible ones included),
and the loss is the mean squared error on the kept positions the encoder did not see, against
targets normalised per channel over each tubelet's pixels (VideoMAE V2's). ``decoder_mask_ratio: 0``
is plain VideoMAE (a mask token at every hidden position, all scored).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

from pretrain.errors import ConfigError
from pretrain.models.patch_embed import patchify_3d, unpatchify_3d
from pretrain.models.pos_embed import sincos_3d
from pretrain.backbone import build_vit
from pretrain.models.vit import VIT_PRESETS, VisionTransformer
from pretrain.objectives.base import (Activation, DataSpec, Objective, ObjectiveOutput, TrunkPass,
                                     embed_every_stem, register)
from pretrain.objectives.hiend import DecoderSettings, decoder_taps
from pretrain.objectives.mae import DecoderShape, LightDecoder, masked_patch_loss
from pretrain.objectives.masking import PerSample, cell_drops, check_decoder_grid, dual_masks, gather_tokens, masked_count

TARGET_NORMS = ("channel", "tubelet")


def tubelet_targets(patches: torch.Tensor, channels: int, norm: str) -> torch.Tensor:
    """Reconstruction targets of tubelets [..., t*p*p*C] (channel last, as :func:`patchify_3d` orders them).

    ``channel`` (VideoMAE V2's): each channel is normalised over the tubelet's t*p*p pixels by its mean and
    unbiased standard deviation, ``(x - mean) / (std + 1e-6)``; ``tubelet``: all t*p*p*C values jointly,
    ``(x - mean) / sqrt(var + 1e-6)`` (MAE's rule); ``none``: the pixels as they are.
    """
    patches = patches.float()
    if norm == "none":
        return patches
    if norm == "tubelet":
        return (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_channel = patches.unflatten(-1, (-1, channels))
    mean, std = per_channel.mean(-2, keepdim=True), per_channel.var(-2, keepdim=True).sqrt()
    return ((per_channel - mean) / (std + 1e-6)).flatten(-2)


def untarget(pred: torch.Tensor, patches: torch.Tensor, channels: int, norm: str) -> torch.Tensor:
    """Predictions in target space back to pixels, with the statistics of the true tubelets (for display)."""
    if norm == "none":
        return pred
    if norm == "tubelet":
        return pred * (patches.var(-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(-1, keepdim=True)
    per_channel = patches.unflatten(-1, (-1, channels))
    mean, std = per_channel.mean(-2, keepdim=True), per_channel.var(-2, keepdim=True).sqrt()
    return (pred.unflatten(-1, (-1, channels)) * (std + 1e-6) + mean).flatten(-2)


class VideoMAEModel(LightDecoder):
    """3D encoder + light decoder. forward(clips, visible ids, decoded ids, scored) -> (loss, pred, decoded ids)."""

    def __init__(self, encoder: VisionTransformer, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 norm_pix_loss: bool, target_norm: str = "channel", decoder_layers=None):
        super().__init__(encoder, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss,
                         sincos_3d(decoder_dim, *encoder.grid),
                         encoder.tubelet * encoder.patch_size ** 2 * encoder.in_chans, decoder_layers)
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"objective.videomae.target_norm={target_norm!r} is not one of {list(TARGET_NORMS)}")
        self.target_norm = target_norm if norm_pix_loss else "none"

    def forward(self, clips: torch.Tensor, visible_ids: torch.Tensor, decoded_ids: torch.Tensor,
                scored: torch.Tensor) -> tuple:
        """Encode the visible tubelets, decode them with mask tokens at ``decoded_ids``, score the hidden ones.

        Args:
            clips: [B, C, T, H, W] (video) or [B, C, D, H, W] (volume).
            visible_ids: [B, V] the tubelets the encoder sees, ascending (same count per sample).
            decoded_ids: [B, M] the positions that get a mask token in the decoder, ascending.
            scored: [B, M] bool, the decoded positions the encoder did not see (the loss averages over
                all of them in the batch).

        Returns:
            loss, pred [B, M, t*p*p*C], decoded ids [B, M].
        """
        enc = self.encoder
        latent, taps = self.encode(gather_tokens(embed_every_stem(enc, clips), visible_ids))
        prefix = enc.num_prefix_tokens
        x = self.decoder_embed(latent)
        pos = self.decoder_pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
        visible = x[:, prefix:] + gather_tokens(pos, visible_ids)
        hidden = self.mask_token.to(x.dtype) + gather_tokens(pos, decoded_ids)
        x = torch.cat([x[:, :prefix], visible, hidden], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(self.cross(x, taps)))[:, -decoded_ids.shape[1]:]
        patches = gather_tokens(patchify_3d(clips, enc.tubelet, enc.patch_size), decoded_ids)
        target = tubelet_targets(patches, clips.shape[1], self.target_norm)
        return masked_patch_loss(pred, target, scored.to(pred.dtype), norm_pix=False), pred, decoded_ids


@dataclass
class VideoMAEConfig(DecoderSettings):
    """VideoMAE V2 on clips and volumes: tube (video) or random 3D (volume) encoder masking, running-cell
    decoder masking. Defaults are VideoMAE V2's."""

    choices = {**DecoderSettings.choices, "encoder_masking": ("auto", "tube", "random")}

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

    def validate(self, cfg) -> None:
        """Clips (video) or volumes (CT) to train on."""
        if cfg.data.modality not in ("video", "ct"):
            raise ConfigError(f"objective videomae trains on clips or volumes; data.modality={cfg.data.modality}")
        decoder_taps(self, cfg.model.depth or VIT_PRESETS[cfg.model.size][1], "objective.videomae")


@register("videomae", settings=VideoMAEConfig, old_names=("videomae_v2",))
class VideoMAEObjective(Objective):
    """VideoMAE V2 dual masking on clips (data.modality video) or CT volumes (ct)."""

    def __init__(self, cfg):
        if not cfg.model.frames:
            raise ValueError("objective videomae needs a 3D model: set model.frames (clip length or crop depth)")
        self.cfg = cfg
        v = cfg.objective.videomae
        self.settings = v
        encoder = build_vit(cfg.model)
        self.model = VideoMAEModel(encoder, v.decoder_dim, v.decoder_depth, v.decoder_heads, v.norm_pix_loss,
                                   v.target_norm, decoder_taps(v, len(encoder.blocks), "objective.videomae"))
        check_decoder_grid(self.model.encoder.grid, v.decoder_mask_ratio)
        masking = v.encoder_masking
        self.masking = masking if masking != "auto" else ("tube" if cfg.data.modality == "video" else "random")
        self.view = "clip" if cfg.data.modality == "video" else "volume"
        self.draw = PerSample(dual_masks, grid=tuple(self.model.encoder.grid), masking=self.masking,
                              ratio=v.mask_ratio, decoder_ratio=v.decoder_mask_ratio)

    def data_spec(self) -> DataSpec:
        m = self.cfg.model
        return DataSpec(kind=self.view, img_size=m.img_size, in_chans=m.in_chans, frames=m.frames, depth=m.frames,
                        masks=self.draw)

    def trainable(self) -> nn.Module:
        return self.model

    def encoder(self) -> nn.Module:
        return self.model.encoder

    def masks(self, seeds: torch.Tensor) -> tuple:
        """(encoder mask [B, N] bool, decoded ids [B, M], scored [B, M] bool) from the samples' seeds."""
        drawn = self.draw.batch(seeds)
        return drawn["encoder_mask"], drawn["decoded_ids"], drawn["scored"]

    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        clips = batch[self.view]
        if "visible_ids" not in batch:  # drawn in the DataLoader workers; drawn here for a batch without them
            batch = {**batch, **self.draw.batch(batch["seed"])}
        mask = batch["encoder_mask"]  # host-side: only the logged reconstruction uses it
        visible_ids, decoded_ids, scored = (batch[name].to(clips.device, non_blocking=True)
                                            for name in ("visible_ids", "decoded_ids", "scored"))
        loss, pred, decoded_ids = model(clips, visible_ids, decoded_ids, scored)
        visible, decoded, tokens = visible_ids.shape[1], decoded_ids.shape[1], mask.shape[1]
        return ObjectiveOutput(
            loss=loss,
            metrics={"visible_tokens": float(visible), "decoded_tokens": float(decoded),
                     "scored_tokens": scored.sum() / len(mask),  # a tensor: read at logging steps only
                     "decoder_input_tokens": float(visible + decoded), "mask_ratio": 1.0 - visible / tokens},
            visuals={"pred": pred.detach(), "mask": mask.detach(), "decoded_ids": decoded_ids.detach()},
        )

    def token_passes(self) -> List[TrunkPass]:
        """Encoder on the visible tubelets, decoder on visible + reconstructed ones."""
        enc, v = self.model.encoder, self.settings
        prefix, tokens = enc.num_prefix_tokens, enc.num_patches
        if self.masking == "tube":
            masked = enc.grid[0] * masked_count(enc.grid[1] * enc.grid[2], v.mask_ratio)
        else:
            masked = masked_count(tokens, v.mask_ratio)
        visible = tokens - masked
        decoded = tokens * (4 - cell_drops(v.decoder_mask_ratio)) // 4 if v.decoder_mask_ratio else masked
        width = self.model.decoder_embed.out_features
        pixels = enc.tubelet * enc.patch_size ** 2 * enc.in_chans
        return [
            TrunkPass("encoder (visible tubelets)", enc, prefix + visible, 1, activations=[
                Activation("input clip", 1, enc.in_chans * enc.frames * enc.img_size ** 2),
                Activation("tubelet tokens before masking", tokens, enc.embed_dim),
                Activation("final norm and decoder embedding inputs", prefix + visible, enc.embed_dim, 2)]),
            TrunkPass("decoder (visible + reconstructed)", DecoderShape(self.model), prefix + visible + decoded, 1,
                      activations=[Activation("decoder norm and pixel head inputs", prefix + visible + decoded, width, 2),
                                   Activation("loss: prediction, target, error", decoded, pixels, 3, fp32=True)]),
        ]

    def render(self, batch: dict, out: ObjectiveOutput, frames: int = 8) -> Dict[str, np.ndarray]:
        """A strip for the first sample, one column per frame (or slice; at most ``frames``), four rows:
        input | what the encoder sees | what the loss scores | reconstruction (scored tubelets filled in)."""
        enc = self.model.encoder
        clip = batch[self.view][:1].detach().float().cpu()
        patches = patchify_3d(clip, enc.tubelet, enc.patch_size)[0]
        mask = out.visuals["mask"][0].cpu()
        decoded = out.visuals["decoded_ids"][0].cpu()
        hidden = mask[decoded]
        ids = decoded[hidden]
        pred = untarget(out.visuals["pred"][0].float().cpu()[hidden], patches[ids], clip.shape[1], self.model.target_norm)
        low = float(patches.min())
        seen = torch.where(mask[:, None], torch.full_like(patches, low), patches)
        goal, recon = seen.clone(), seen.clone()
        goal[ids], recon[ids] = patches[ids], pred
        rows = [unpatchify_3d(p[None], enc.tubelet, enc.patch_size, clip.shape[1], enc.grid)[0]
                for p in (patches, seen, goal, recon)]
        step = max(1, clip.shape[2] // frames)
        strip = torch.cat([torch.cat(list(r[:, ::step].unbind(1)), dim=2) for r in rows], dim=1)  # [C, 4H, F*W]
        strip = strip[:3] if strip.shape[0] >= 3 else strip[:1]
        low, high = strip.min(), strip.max()
        pixels = ((strip - low) / (high - low + 1e-8) * 255).round().byte()
        return {"reconstruction": pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()}
