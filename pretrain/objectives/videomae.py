"""VideoMAE V2 on video clips and CT volumes: tubelet tokens, encoder masking, running-cell decoder masking.

The encoder (the shared ViT trunk with a 3D tubelet stem) sees only the visible tubelets
(about 10%: tube masking for video, random 3D masking for volumes). The decoder gets the
encoder's visible tokens plus mask tokens at only a subset of the hidden positions
(dual masking: the running-cell pattern leaves out ``decoder_mask_ratio`` of them), and the
loss is the mean squared error on exactly those reconstructed positions, against targets
normalised per tubelet. ``decoder_mask_ratio: 0`` is plain VideoMAE.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import torch
from torch import nn

from pretrain.models.patch_embed import patchify_3d, unpatchify_3d
from pretrain.models.pos_embed import sincos_3d
from pretrain.models.vit import VisionTransformer, build_vit
from pretrain.objectives.base import DataSpec, Objective, ObjectiveOutput, register
from pretrain.objectives.mae import DecoderShape, LightDecoder, masked_patch_loss
from pretrain.objectives.masking import PerSample, dual_masks, gather_tokens


class VideoMAEModel(LightDecoder):
    """3D encoder + light decoder. forward(clips, mask, targets) -> (loss, pred, target ids)."""

    def __init__(self, encoder: VisionTransformer, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 norm_pix_loss: bool):
        super().__init__(encoder, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss,
                         sincos_3d(decoder_dim, *encoder.grid),
                         encoder.tubelet * encoder.patch_size ** 2 * encoder.in_chans)

    def forward(self, clips: torch.Tensor, visible_ids: torch.Tensor, target_ids: torch.Tensor) -> tuple:
        """Encode the visible tubelets, decode visible + the chosen hidden ones, score those.

        Args:
            clips: [B, C, T, H, W] (video) or [B, C, D, H, W] (volume).
            visible_ids: [B, V] the tubelets the encoder sees, ascending (same count per sample).
            target_ids: [B, M] the hidden tubelets the decoder reconstructs, ascending.

        Returns:
            loss, pred [B, M, t*p*p*C], target ids [B, M].
        """
        enc = self.encoder
        latent = enc.forward_tokens(gather_tokens(enc.embed_patches(clips), visible_ids))
        prefix = enc.num_prefix_tokens
        x = self.decoder_embed(latent)
        pos = self.decoder_pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
        visible = x[:, prefix:] + gather_tokens(pos, visible_ids)
        hidden = self.mask_token.to(x.dtype) + gather_tokens(pos, target_ids)
        x = torch.cat([x[:, :prefix], visible, hidden], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, -target_ids.shape[1]:]
        target = gather_tokens(patchify_3d(clips, enc.tubelet, enc.patch_size), target_ids)
        loss = masked_patch_loss(pred, target, torch.ones(pred.shape[:2], device=pred.device), self.norm_pix_loss)
        return loss, pred, target_ids


@register("videomae_v2")
class VideoMAEObjective(Objective):
    """VideoMAE V2 dual masking on clips (data.modality video) or CT volumes (ct)."""

    def __init__(self, cfg):
        if not cfg.model.frames:
            raise ValueError("objective videomae_v2 needs a 3D model: set model.frames (clip length or crop depth)")
        self.cfg = cfg
        v = cfg.objective.videomae
        self.settings = v
        self.model = VideoMAEModel(build_vit(cfg.model), v.decoder_dim, v.decoder_depth, v.decoder_heads,
                                   v.norm_pix_loss)
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
        """(encoder mask, decoder targets), both [B, N] bool, from the samples' seeds."""
        drawn = self.draw.batch(seeds)
        return drawn["encoder_mask"], drawn["decoder_targets"]

    def __call__(self, model: Callable, batch: dict, step: int) -> ObjectiveOutput:
        clips = batch[self.view]
        if "visible_ids" not in batch:  # drawn in the DataLoader workers; drawn here for a batch without them
            batch = {**batch, **self.draw.batch(batch["seed"])}
        mask = batch["encoder_mask"]  # host-side: only the logged reconstruction uses it
        visible_ids, target_ids = (batch[name].to(clips.device, non_blocking=True)
                                   for name in ("visible_ids", "target_ids"))
        loss, pred, target_ids = model(clips, visible_ids, target_ids)
        visible, decoded, tokens = visible_ids.shape[1], target_ids.shape[1], mask.shape[1]
        return ObjectiveOutput(
            loss=loss,
            metrics={"visible_tokens": float(visible), "decoded_tokens": float(decoded),
                     "decoder_input_tokens": float(visible + decoded), "mask_ratio": 1.0 - visible / tokens},
            visuals={"pred": pred.detach(), "mask": mask.detach(), "target_ids": target_ids.detach()},
        )

    def token_passes(self, batch: int) -> list:
        """Encoder on the visible tubelets, decoder on visible + reconstructed ones."""
        from pretrain.plan import trunk_pass

        enc, v = self.model.encoder, self.settings
        prefix, tokens = enc.num_prefix_tokens, enc.num_patches
        masked = round(v.mask_ratio * tokens)
        visible = tokens - masked
        decoded = masked - round(v.decoder_mask_ratio * masked)
        width = self.model.decoder_embed.out_features
        pixels = enc.tubelet * enc.patch_size ** 2 * enc.in_chans
        clip = enc.in_chans * enc.frames * enc.img_size ** 2
        return [
            trunk_pass("encoder (visible tubelets)", enc, prefix + visible, 1,
                       extra_per_crop=clip + tokens * enc.embed_dim + 2 * (prefix + visible) * enc.embed_dim),
            trunk_pass("decoder (visible + reconstructed)", DecoderShape(self.model), prefix + visible + decoded, 1,
                       extra_per_crop=2 * (prefix + visible + decoded) * width, fp32_per_crop=3 * decoded * pixels),
        ]

    def render(self, batch: dict, out: ObjectiveOutput, frames: int = 8) -> Dict[str, np.ndarray]:
        """A strip for the first sample, one column per frame (or slice; at most ``frames``), four rows:
        input | what the encoder sees | the decoder's targets | reconstruction (targets filled in)."""
        enc = self.model.encoder
        clip = batch[self.view][:1].detach().float().cpu()
        patches = patchify_3d(clip, enc.tubelet, enc.patch_size)[0]
        mask = out.visuals["mask"][0].cpu()
        ids = out.visuals["target_ids"][0].cpu()
        pred = out.visuals["pred"][0].float().cpu()
        if self.model.norm_pix_loss:
            target = patches[ids]
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
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
