"""Vision Transformer encoder with sin-cos (or learned) positions, optional registers, LayerScale and SwiGLU.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``reg_token``, ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ``norm``...) so that an
export is a rename-free copy. Positions are added to patch tokens only (timm's
``no_embed_class=True``); class and register tokens carry none. The table (``pos_embed``,
[1, N, D]) is a fixed sin-cos buffer (rows in the first half of the width, or MAE's
columns-first layout) or a learned parameter initialised to the sin-cos table.
"""
from __future__ import annotations

import math
from copy import deepcopy
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.attention import BlockDiagonal
from pretrain.models.blocks import Block, init_weights
from pretrain.models.norm import layer_norm
from pretrain.models import rope as rotary
from pretrain.models.rope import Rope, packed_tables, square_grid
from pretrain.models.patch_embed import PatchEmbed2D, PatchEmbed3D
from pretrain.models.pos_embed import resample_2d, resample_3d, sincos_3d, table_2d

VIT_PRESETS = {
    # name: (embed_dim, depth, num_heads, mlp_ratio)
    "tiny": (64, 2, 4, 4.0),
    "S": (384, 12, 6, 4.0),
    "B": (768, 12, 12, 4.0),
    "L": (1024, 24, 16, 4.0),
    "H": (1280, 32, 16, 4.0),
    "g": (1408, 40, 16, 48 / 11),
}


PACKING = ("auto", "always", "never")


class VisionTransformer(nn.Module):
    """ViT encoder: patch tokens + 2D positions, class (+ register) tokens, blocks, norm.

    The positions are a table for the configured ``img_size``: with ``pos_embed_mode`` 'sincos'
    (ours) or 'sincos_mae' (MAE's columns-first layout) a non-trained buffer, with 'learned' a
    parameter (``pos_embed``) initialised to the sin-cos table; with 'rope' no table at all
    (``pos_embed`` is None): DINOv3's rotary positions rotate q and k of the patch tokens in every
    block (:mod:`pretrain.models.rope`). Other image sizes get the table
    resampled bicubically (differentiably, for the learned one). 3D (``frames``) encoders have
    the fixed separable 3D table only. With ``activation_checkpointing=k``, every k-th block keeps
    no activations in training and recomputes them in backward.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_registers: int = 0,
                 layer_scale_init: float = 0.0, drop_path: float = 0.0, attn_backend: str = "auto",
                 activation_checkpointing: int = 0, ffn: str = "mlp", stems: Optional[Dict[str, int]] = None,
                 frames: int = 0, tubelet: int = 2, norm_impl: str = "torch", pos_embed_mode: str = "sincos",
                 norm_eps: float = 1e-6, rope: Optional[dict] = None, key_bias: bool = True):
        super().__init__()
        if frames and pos_embed_mode != "sincos":
            raise ValueError(f"pos_embed {pos_embed_mode!r}: 3D (frames={frames}) encoders have the fixed sincos "
                             "table only")
        self.pos_embed_mode = pos_embed_mode
        self.norm_eps = norm_eps
        self.rope = Rope(embed_dim // num_heads, **(rope or {})) if pos_embed_mode == "rope" else None
        """DINOv3's rotary positions (no table: q and k of the patch tokens are rotated in every block)."""
        self.frames = frames
        self.tubelet = tubelet
        self.ffn = ffn
        self.img_size = img_size
        self.activation_checkpointing = activation_checkpointing
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_registers = num_registers
        self.layer_scale_init = layer_scale_init
        self.num_prefix_tokens = 1 + num_registers
        self.patch_embed = self._stem(in_chans)
        self.stems = nn.ModuleDict({name: self._stem(chans)
                                    for name, chans in sorted((stems or {}).items())}) if stems else None
        if frames:  # clips [B, C, T, H, W] or volumes [B, C, D, H, W]: t x p x p tubelets
            self.grid = self.patch_embed.grid(frames, img_size, img_size)
            self.register_buffer("pos_embed", sincos_3d(embed_dim, *self.grid)[None], persistent=False)
        else:
            self.grid = self.patch_embed.grid(img_size, img_size)
            table = None if self.rope else table_2d(pos_embed_mode, embed_dim, *self.grid)[None]
            if pos_embed_mode == "learned":
                self.pos_embed = nn.Parameter(table)
            else:
                self.register_buffer("pos_embed", table, persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layer_scale_init, rates[i], attn_backend, ffn, norm_impl, norm_eps,
                  key_bias)
            for i in range(depth)
        )
        self.norm = layer_norm(embed_dim, norm_eps, norm_impl)
        self.apply(init_weights)
        for embed in self.all_stems():
            proj = embed.proj.weight
            nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=0.02)

    def _stem(self, chans: int) -> nn.Module:
        """A patch embedding for ``chans`` channels: 2D patches, or 3D tubelets when ``frames`` is set."""
        if self.frames:
            return PatchEmbed3D(self.tubelet, self.patch_size, chans, self.embed_dim)
        return PatchEmbed2D(self.patch_size, chans, self.embed_dim)

    @property
    def num_patches(self) -> int:
        """Patch (tubelet) tokens at the configured input size."""
        return math.prod(self.grid)

    def positions(self, grid: tuple) -> torch.Tensor:
        """Position embedding for a token grid: [1, N, D] (resampled for another input size)."""
        resample = resample_3d if len(grid) == 3 else resample_2d
        return resample(self.pos_embed[0], self.grid, grid)[None]

    def stem(self, name: Optional[str] = None) -> PatchEmbed2D:
        """The patch embedding of stem ``name``: ``patch_embed`` for None or '' (the main stem), else that
        extra stem.

        Raises:
            ValueError: the encoder has no stem of that name.
        """
        if not name:
            return self.patch_embed
        if self.stems is None or name not in self.stems:
            raise ValueError(f"stem {name!r}: this encoder has extra stems {sorted(self.stems or {})}")
        return self.stems[name]

    def all_stems(self) -> List[nn.Module]:
        """Every patch embedding, in one fixed order: ``patch_embed``, then the extra stems by name."""
        return [self.patch_embed, *(self.stems.values() if self.stems is not None else [])]

    def patch_tokens(self, tokens: torch.Tensor, grid: tuple, mask: Optional[torch.Tensor] = None,
                     mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A stem's output made the trunk's input: masked patches replaced, positions added.

        Args:
            tokens: [B, N, D] a stem's tokens of a ``grid`` of patches (tubelets).
            mask: optional [B, N] bool; masked patches are replaced by ``mask_token`` ([D]) before
                positions are added (iBOT).

        Returns:
            [B, N, D] patch tokens with positions (none added with rotary positions: they enter in
            every block's attention).
        """
        if mask is not None:
            tokens = torch.where(mask[..., None], mask_token.to(tokens.dtype), tokens)
        if self.rope is not None:
            return tokens
        return tokens + self.positions(grid).to(tokens.dtype)

    def embed_patches(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      mask_token: Optional[torch.Tensor] = None, stem: Optional[str] = None) -> torch.Tensor:
        """Patch tokens with positions [B, N, D] (no prefix tokens) of ``images`` [B, C, H, W] through stem
        ``stem`` (see :meth:`stem`) alone; ``mask``, ``mask_token`` as :meth:`patch_tokens`."""
        embed = self.stem(stem)
        return self.patch_tokens(embed(images), embed.grid(*images.shape[2:]), mask, mask_token)

    def forward_tokens(self, tokens: torch.Tensor, grid: Optional[tuple] = None) -> torch.Tensor:
        """Prepend class (+ register) tokens and run the trunk.

        Args:
            tokens: [B, N, D] patch tokens with positions (all of them, or a visible subset).
            grid: their (rows, cols) patch grid, for rotary positions (default: square).

        Returns:
            [B, 1 + R + N, D] normalised features: class token, registers, patches.
        """
        return self.norm(self.trunk_tokens(tokens, grid))

    def trunk_tokens(self, tokens: torch.Tensor, grid: Optional[tuple] = None, taps: Optional[dict] = None
                     ) -> torch.Tensor:
        """:meth:`forward_tokens` before the final norm (what feature distillation reads of a teacher); ``taps``:
        {depth: None} filled with the residual stream after block ``depth`` (1-based; a hierarchical decoder's
        inputs)."""
        return self._trunk(self._with_prefix(tokens), rope=self._rope_tables(tokens, grid), taps=taps)

    def _rope_tables(self, tokens: torch.Tensor, grid: Optional[tuple] = None):
        """Rotary (cos, sin) for a prefix + the patch grid of ``tokens`` [B, N, D] (square unless ``grid`` says),
        as a function the trunk calls once per block (DINOv3 draws the training augmentation per block); None
        without rope."""
        if self.rope is None:
            return None
        grid = tuple(grid) if grid is not None else square_grid(tokens.shape[1])
        if grid[0] * grid[1] != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        rope = self.rope
        if not (self.training and (rope.shift or rope.jitter or rope.rescale)):  # nothing drawn: one table for all
            tables = rope.tables(grid, self.num_prefix_tokens, tokens.device, tokens.dtype, False)
            return lambda: tables
        return lambda: rope.tables(grid, self.num_prefix_tokens, tokens.device, tokens.dtype, True)

    def _with_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        prefix = [self.cls_token.expand(tokens.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(tokens.shape[0], -1, -1))
        return torch.cat(prefix + [tokens], dim=1)

    def _trunk(self, x: torch.Tensor, packed: Optional[BlockDiagonal] = None, rope=None,
               taps: Optional[dict] = None) -> torch.Tensor:
        """The blocks; ``rope``: a function giving each block its rotary tables (drawn outside any checkpoint,
        so a recomputed block sees the tables it had); ``taps``: {depth: None} filled with the output of block
        ``depth`` (1-based)."""
        every = self.activation_checkpointing
        for index, block in enumerate(self.blocks):
            tables = rope() if rope is not None else None
            if every and self.training and index % every == 0:
                x = checkpoint(block, x, packed, tables, use_reentrant=False)  # RNG state is replayed: same drop path
            else:
                x = block(x, packed, tables)
            if taps is not None and index + 1 in taps:
                taps[index + 1] = x
        return x

    def forward_tokens_many(self, groups: List[torch.Tensor], pack: str = "auto") -> List[torch.Tensor]:
        """:meth:`forward_tokens` of several token batches of different lengths (DINOv2's global and local
        crops), in one packed pass or one pass each.

        Packed, every sequence of every group goes into one row, attending only within itself
        (xformers' block-diagonal mask): one trunk pass, so ZeRO-3 gathers each block once.

        Args:
            groups: [B_i, N_i, D] patch tokens with positions.
            pack: auto (pack when attention runs on xformers), always (also with sdpa's dense mask:
                slower, for checking), never.

        Returns:
            the features of each group, [B_i, 1 + R + N_i, D].
        """
        if pack not in PACKING:
            raise ValueError(f"pack {pack!r} is not one of {list(PACKING)}")
        kernel = self.blocks[0].attn.kernel
        if len(groups) < 2 or pack == "never" or (pack == "auto" and kernel != "xformers"):
            return [self.forward_tokens(tokens) for tokens in groups]
        rows = [self._with_prefix(tokens) for tokens in groups]
        lengths = [n for x in rows for n in [x.shape[1]] * x.shape[0]]
        rope = None
        if self.rope is not None:  # per block, one draw of the training augmentation per group, as unpacked
            tables = [self._rope_tables(tokens) for tokens in groups]
            rope = lambda: packed_tables([draw() for draw in tables], [len(t) for t in groups])  # noqa: E731
        packed = self._trunk(torch.cat([x.reshape(1, -1, x.shape[-1]) for x in rows], dim=1), BlockDiagonal(lengths),
                             rope)
        features = self.norm(packed).split([x.shape[0] * x.shape[1] for x in rows], dim=1)
        return [f.reshape(x.shape) for f, x in zip(features, rows)]

    def forward(self, images: torch.Tensor, stem: Optional[str] = None) -> torch.Tensor:
        """images: [B, C, H, W] -> features [B, 1 + R + N, D] (timm's ``forward_features``)."""
        return self.forward_tokens(self.embed_patches(images, stem=stem), self.stem(stem).grid(*images.shape[2:]))

    def with_stem(self, name: Optional[str] = None) -> "VisionTransformer":
        """A copy with stem ``name`` as its only patch embedding (what an export writes): a plain ViT."""
        chosen = self.stem(name)
        stems, self.stems = self.stems, None
        try:
            copy = deepcopy(self)
        finally:
            self.stems = stems
        copy.patch_embed = deepcopy(chosen)
        copy.in_chans = chosen.in_chans
        return copy

    @torch.no_grad()
    def class_attention(self, images: torch.Tensor, stem: Optional[str] = None) -> torch.Tensor:
        """The last block's attention of the class token over the patches: [B, heads, N] (for display)."""
        tokens = self.embed_patches(images, stem=stem)
        draw = self._rope_tables(tokens, self.stem(stem).grid(*images.shape[2:]))
        rope = draw() if draw is not None else None  # eval-time tables: the same for every block
        x = self._with_prefix(tokens)
        for block in self.blocks[:-1]:
            x = block(x, None, rope)
        last = self.blocks[-1].attn
        b, n, d = x.shape
        q, k, _ = last.qkv(self.blocks[-1].norm1(x)).reshape(b, n, 3, last.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotary.apply(q, k, rope)
        weights = ((q[:, :, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return weights[:, :, 0, self.num_prefix_tokens:]

