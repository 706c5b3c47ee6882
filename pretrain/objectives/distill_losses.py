"""The distillation losses (objective ``distill``): G2SD's smooth-L1 on normalised features, and feature matching
of class and patch tokens by cosine or mean squared error.

Notation (docs/ARCHITECTURE.md, "Distillation"): ``LN0`` is a layer norm without parameters (eps 1e-6) over
the feature axis; every mean is over all elements of its tensor.

G2SD (generic distillation of a masked autoencoder): with the same mask for both, ``h_T`` the teacher
decoder's tokens after its first k blocks, ``z_T`` the teacher encoder's tokens before its final norm,
``h_S`` the student decoder's tokens after all its blocks (before its norm), ``z_S`` the student encoder's
normed tokens, and ``P_d``, ``P_e`` the student's projector MLPs to the teacher's widths::

    L_dec = mean SmoothL1_beta(P_d(h_S), LN0(h_T))     over the class token and every patch
    L_enc = mean SmoothL1_beta(P_e(z_S), LN0(z_T))     over the class token and the visible patches
    SmoothL1_beta(x, y) = 0.5 (x - y)^2 / beta  where |x - y| < beta,  |x - y| - beta / 2  elsewhere

Feature matching: ``s`` the student's normed tokens through a linear projector ``P`` (identity where the
widths agree), ``t`` the teacher's normed tokens, its patch map resized (bicubic) to the student's grid::

    cosine:  L = mean_tokens (1 - <s, t> / (|s| |t|))
    mse:     L = mean (LN0(s) - LN0(t))^2
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over the last axis without scale or shift (eps 1e-6), in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)


def class_and_patches(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, prefix + N, D] -> [B, 1 + N, D]: the class token and the patches, registers left out (a student and
    a teacher with other register counts line up)."""
    return torch.cat([tokens[:, :1], tokens[:, prefix:]], dim=1)


def g2sd_losses(student_decoder: torch.Tensor, teacher_decoder: torch.Tensor, student_encoder: torch.Tensor,
                teacher_encoder: torch.Tensor, beta: float) -> dict:
    """{'decoder_loss', 'visible_loss'}: smooth-L1 (``beta``) of the projected student tokens against the
    teacher's tokens after a parameter-free layer norm; inputs aligned token for token, [B, T, D_teacher]."""
    return {
        "decoder_loss": F.smooth_l1_loss(student_decoder.float(), plain_norm(teacher_decoder), beta=beta),
        "visible_loss": F.smooth_l1_loss(student_encoder.float(), plain_norm(teacher_encoder), beta=beta),
    }


def resize_patch_map(patches: torch.Tensor, grid: tuple, to_grid: tuple) -> torch.Tensor:
    """[B, H*W, D] patch tokens on ``grid`` (H, W) -> [B, H'*W', D] on ``to_grid``, bicubic (unchanged when
    the grids agree)."""
    if tuple(grid) == tuple(to_grid):
        return patches
    maps = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid).float()
    maps = F.interpolate(maps, size=tuple(to_grid), mode="bicubic", align_corners=False)
    return maps.flatten(2).transpose(1, 2).to(patches.dtype)


def token_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean cosine distance (``cosine``) or mean squared error of the plain-normed tokens (``mse``), fp32."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
    if kind == "mse":
        return ((plain_norm(student) - plain_norm(teacher)) ** 2).mean()
    raise ValueError(f"feature distance {kind!r} is not 'cosine' or 'mse'")


def feature_losses(student_cls: torch.Tensor, teacher_cls: torch.Tensor, student_patches: torch.Tensor,
                   teacher_patches: torch.Tensor, kind: str) -> dict:
    """{'cls_loss', 'patch_loss'}: :func:`token_distance` of the (projected) student's class tokens [B, D] and
    patch tokens [B, N, D] against the teacher's, on the same grid."""
    return {"cls_loss": token_distance(student_cls, teacher_cls, kind),
            "patch_loss": token_distance(student_patches, teacher_patches, kind)}
