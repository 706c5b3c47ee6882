"""The DINOv2 losses and teacher centerings as plain functions of tensors.

Nothing here talks to other processes. Where a quantity must be global (Sinkhorn-Knopp's
normalisations, the running centre's batch mean), the caller passes ``all_reduce``, a
function summing a tensor over all ranks (``pretrain.dist.all_reduce_tensor`` in training,
the identity in one process), so every function is testable alone.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3,
                   all_reduce: Reduce = _identity) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp: an (approximately) equipartitioned soft assignment.

    Starting from ``exp(logits / T)``, rows (prototypes) and columns (samples) are normalised
    in turn so that, over all ranks, every prototype receives the same total mass 1/K and
    every sample a total of 1; the result is scaled so each sample's row sums to 1.

    Args:
        logits: [B, K] teacher logits of this rank's samples (B may differ between ranks).
        temperature: teacher temperature.
        iterations: normalisation rounds.
        all_reduce: sums a tensor over ranks.

    Returns:
        [B, K] targets; each row sums to 1.
    """
    q = torch.exp(logits.float() / temperature).t()  # [K, B]
    prototypes = q.shape[0]
    samples = all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q = q / all_reduce(q.sum())
    for _ in range(iterations):
        q = q / all_reduce(q.sum(dim=1, keepdim=True)) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / samples
    return (q * samples).t()


def softmax_centered(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher targets by a running centre: softmax((logits - center) / T). logits: [B, K], center: [K]."""
    return F.softmax((logits.float() - center) / temperature, dim=-1)


def batch_center(logits: torch.Tensor, all_reduce: Reduce = _identity) -> torch.Tensor:
    """The mean logit vector over every rank's samples: [K] (what a running centre moves towards).

    Every sample weighs the same (DINOv2's iBOT centre instead averages the ranks' means of their masked
    patches; one process, or equal counts per rank, gives the same)."""
    total = all_reduce(logits.float().sum(dim=0))
    count = all_reduce(torch.tensor(float(logits.shape[0]), device=logits.device))
    return total / count.clamp(min=1.0)


def dino_loss(student_logits: List[torch.Tensor], teacher_probs: List[torch.Tensor],
              student_temperature: float) -> torch.Tensor:
    """DINO cross-entropy of every student crop against every teacher global crop but its own view.

    Args:
        student_logits: one [B, K] tensor per student crop; the first ``len(teacher_probs)``
            are the global crops, in the teacher's order.
        teacher_probs: one [B, K] target tensor per teacher global crop.
        student_temperature: temperature of the student softmax.

    Returns:
        The mean over (student crop, teacher crop) pairs of the batch-mean cross-entropy. This is DINOv2's
        ``SSLMetaArch.forward_backward`` assembly whenever there are local crops; without any, DINOv2 divides
        the two global pairs' sum by 3 (its ``max(n_local * 2, 1)``), this by 2.
    """
    total, terms = 0.0, 0
    for s_index, logits in enumerate(student_logits):
        log_probs = F.log_softmax(logits.float() / student_temperature, dim=-1)
        for t_index, probs in enumerate(teacher_probs):
            if s_index == t_index:
                continue
            total = total + (-(probs * log_probs).sum(dim=-1)).mean()
            terms += 1
    if terms == 0:
        raise ValueError("DINO loss needs at least two crops")
    return total / terms


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor, images: int,
              student_temperature: float) -> torch.Tensor:
    """iBOT masked-patch cross-entropy.

    Args:
        student_logits: [M, K] student logits of the masked patches (all images together).
        teacher_probs: [M, K] teacher targets of the same patches.
        weights: [M] weight of each patch: 1 / (masked patches of its image), so each image counts once.
        images: global crops in the batch, masked or not (the denominator).
        student_temperature: temperature of the student softmax.

    Returns:
        sum(weight * cross-entropy) / images.
    """
    log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    per_patch = -(teacher_probs * log_probs).sum(dim=-1)
    return (per_patch * weights).sum() / max(1, images)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: -mean(log(distance to the nearest other sample + eps)).

    As DINOv2's ``KoLeoLoss`` except on exact duplicates: its ``PairwiseDistance(eps)`` measures
    ``||x - y + eps||``, so a duplicate's distance is ``sqrt(D) * eps`` with a gradient of order 1 / eps;
    here it is 0, the term ``-log(eps)``, with a zero gradient. Self is excluded by a diagonal of -2 (below
    any cosine; DINOv2's -1 ties with an exactly antipodal neighbour).

    Args:
        features: [B, D] (normalised inside).
    """
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.t()
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    distance = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distance + eps).mean()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of [B, K] probabilities."""
    return -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1).mean()
