"""Parity of the DINOv2 objective with the reference (facebookresearch/dinov2), issue 17.

Every expected value here is written in the test from the paper's equations and from reading the
reference code (dinov2/loss/*.py, dinov2/train/ssl_meta_arch.py, dinov2/data/{collate,masking}.py),
as plain float64 numpy loops; nothing calls the reference, nothing computes the expected value with
the function under test. Each test names the reference function it mirrors.

Known, deliberate differences from the reference (see the individual docstrings):

* KoLeo: the reference's ``nn.PairwiseDistance(2, eps=1e-8)`` measures ``||x_i - x_nn + eps||``, ours
  ``||x_i - x_nn||`` (equal to ~1e-8 for distinct rows; for exact duplicates ours gives the term
  ``-log(eps)`` with a zero gradient, the reference ``-log((sqrt(D) + 1) eps)`` with a ~1e8 gradient).
  The reference excludes self by writing -1 on the diagonal of the dot products (an exactly antipodal
  neighbour then ties with self); ours writes -2, below any cosine.
* iBOT running centre over several ranks: the reference averages the per-rank means of the masked
  patches (``len_teacher_patch_tokens`` is 1 after its ``unsqueeze(0)``), ours weights every masked patch
  once (``batch_center``). One process: identical.
* iBOT masks: the reference masks exactly ``int(2B * probability)`` crops of each batch with stratified
  ratios (``linspace`` strata), ``int(N * ratio)`` patches, rectangles of at most N/2 patches that must
  be strictly smaller than the grid, and may fall short of the count; ours masks each crop
  independently with ``probability`` (so a sample's masks depend on its seed alone), with exactly
  ``int(ratio * N)`` patches, ``ratio`` uniform in the range (rectangles, then random single patches).
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pretrain.config import load_config
from pretrain.objectives import build_objective
from pretrain.objectives.dino_losses import (batch_center, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp,
                                             softmax_centered)
from pretrain.objectives.dinov2 import ibot_selection
from pretrain.objectives.masking import ibot_masks

TINY_DINO = [
    "objective.name=dinov2", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.img_size=32",
    "model.patch_size=8", "objective.dinov2.head_prototypes=16", "objective.dinov2.head_hidden_dim=16",
    "objective.dinov2.head_bottleneck_dim=8", "objective.dinov2.local_crops_number=3",
    "objective.dinov2.local_crops_size=16", "train.steps=10",
]


# ----------------------------------------------------------------------------- equations, float64 numpy

def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(target, student_logits, temperature):
    """Per-row H(target, softmax(student / T)) = -sum_k target_k log softmax(student / T)_k."""
    return -(target * log_softmax(student_logits / temperature)).sum(axis=-1)


def sinkhorn_reference(logits, temperature, iterations):
    """DINOv2's sinkhorn_knopp_teacher on one rank, written as loops.

    Q = exp(logits / T)^T [K, B]; Q /= sum(Q); then per round: every row (prototype) divided by its sum and
    by K, every column (sample) by its sum and by B; finally (Q * B)^T. Over ranks the reference all-reduces
    sum(Q) and the row sums and uses B * world, which equals this on the concatenated batch (checked over
    two real processes in tests/test_dinov2.py).
    """
    q = np.exp(np.asarray(logits, dtype=np.float64) / temperature).T.copy()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] /= q[row].sum() * k
        for col in range(b):
            q[:, col] /= q[:, col].sum() * b
    return (q * b).T


def koleo_reference(features, eps=1e-8):
    """DINOv2's KoLeoLoss.forward: normalise, nearest other row by max dot product, PairwiseDistance(eps)."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    terms = []
    for i in range(len(x)):
        dots = [x[i] @ x[j] if j != i else -np.inf for j in range(len(x))]
        nearest = int(np.argmax(dots))
        distance = np.sqrt(((x[i] - x[nearest] + eps) ** 2).sum())  # PairwiseDistance adds eps to the difference
        terms.append(-math.log(distance + eps))
    return float(np.mean(terms))


def dinov2_dino_loss(student_global, student_local, teacher_targets, temperature):
    """ssl_meta_arch.forward_backward's DINO terms, as the reference assembles them.

    student_global: [2B, K] crop-major (crop A then crop B), teacher_targets: [2B, K] in the same order,
    student_local: list of [B, K]. The teacher's chunks are swapped ([t_B; t_A]) so A meets B; the local
    term sums DINOLoss.forward over every (local, teacher) pair, the global term is DINOLoss.forward of the
    2B rows against the swapped targets times loss_scales=2; both divide by 2 * (2 - 1) + 2 * n_local.
    """
    half = len(student_global) // 2
    t_a, t_b = teacher_targets[:half], teacher_targets[half:]
    swapped = np.concatenate([t_b, t_a])
    terms = 2 * (2 - 1) + max(2 * len(student_local), 1)
    local = sum(cross_entropy(t, s, temperature).mean() for s in student_local for t in (t_b, t_a))
    global_ = 2 * cross_entropy(swapped, student_global, temperature).mean()
    return (local + global_) / terms


def ibot_reference(student_patches, teacher_patches, masks, temperature):
    """iBOTPatchLoss.forward_masked with collate_data_and_cast's masks_weight, times ssl_meta_arch's
    loss_scales (2) * ibot_loss_scale (1 / 2): -sum_i w_i sum_k t log softmax(s / T) / (global crops), with
    w_i = 1 / (masked patches of patch i's crop) and the rows in row-major order of the [G, P] masks."""
    owners = [g for g in range(masks.shape[0]) for p in range(masks.shape[1]) if masks[g, p]]
    counts = masks.sum(axis=1)
    ce = cross_entropy(teacher_patches, student_patches, temperature)
    return sum(ce[i] / counts[owners[i]] for i in range(len(owners))) / masks.shape[0] * 2 * (1 / 2)


# ----------------------------------------------------------------------------- the losses

@pytest.mark.parametrize("local_crops", [0, 1, 3])
def test_dino_loss_equals_the_reference_assembly_of_global_and_local_terms(local_crops):
    """mirrors dinov2/loss/dino_clstoken_loss.py DINOLoss.forward as ssl_meta_arch.forward_backward combines
    it (teacher chunks swapped, global term * loss_scales, both / n_global_terms + n_local_terms).

    Deliberate difference without local crops: the reference's n_local_crops_loss_terms is
    max(n_local * 2, 1) = 1, so its DINO loss is the 2 global pairs' sum / 3; ours is their mean (/ 2)."""
    rng = np.random.default_rng(10 + local_crops)
    b, k, tau = 4, 7, 0.1
    student_global = rng.normal(size=(2 * b, k)) * 3
    student_local = [rng.normal(size=(b, k)) * 3 for _ in range(local_crops)]
    teacher = softmax(rng.normal(size=(2 * b, k)) / 0.3)
    expected = dinov2_dino_loss(student_global, student_local, teacher, tau)
    students = [torch.tensor(c) for c in np.split(student_global, 2)] + [torch.tensor(c) for c in student_local]
    got = dino_loss(students, [torch.tensor(c) for c in np.split(teacher, 2)], tau)
    ours_over_reference = 3 / 2 if local_crops == 0 else 1.0
    assert got.item() == pytest.approx(expected * ours_over_reference, rel=1e-6)


def test_ibot_loss_equals_forward_masked_with_collate_weights():
    """mirrors dinov2/loss/ibot_patch_loss.py iBOTPatchLoss.forward_masked, with masks_weight and
    mask_indices_list of dinov2/data/collate.py collate_data_and_cast (here: ours from ibot_selection)."""
    rng = np.random.default_rng(2)
    masks = rng.random((6, 9)) < 0.4
    masks[1] = False  # an unmasked crop still counts in the denominator
    masks[4] = False
    masks[4, 8] = True  # a crop with a single masked patch
    index, weights, m = ibot_selection(torch.tensor(masks))
    assert m == int(masks.sum())
    assert index.tolist() == [g * 9 + p for g in range(6) for p in range(9) if masks[g, p]]  # row-major
    assert np.allclose(weights.numpy(), [1 / masks[g].sum() for g in range(6) for p in range(9) if masks[g, p]])
    student, teacher = rng.normal(size=(m, 5)) * 2, softmax(rng.normal(size=(m, 5)) / 0.2)
    expected = ibot_reference(student, teacher, masks, 0.1)
    got = ibot_loss(torch.tensor(student), torch.tensor(teacher), weights.double(), masks.shape[0], 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the same number as iBOTPatchLoss.forward on dense [G, P, K] tokens: mean over crops of the masked mean
    dense_ce = np.zeros(masks.shape)
    dense_ce[masks] = cross_entropy(teacher, student, 0.1)
    dense = np.mean([dense_ce[g][masks[g]].sum() / max(masks[g].sum(), 1) for g in range(6)])
    assert got.item() == pytest.approx(dense, rel=1e-6)


def test_koleo_equals_the_reference_with_pairwise_distance_eps():
    """mirrors dinov2/loss/koleo_loss.py KoLeoLoss.forward (F.normalize eps 1e-8, pairwise_NNs_inner,
    PairwiseDistance(2, eps=1e-8), -log(d + eps).mean()) on distinct rows of any scale."""
    rng = np.random.default_rng(3)
    for rows, dim, scale in ((5, 4, 1.0), (9, 16, 30.0), (3, 2, 1e-3)):
        x = rng.normal(size=(rows, dim)) * scale
        assert koleo_loss(torch.tensor(x)).item() == pytest.approx(koleo_reference(x), rel=1e-5, abs=1e-6)
    close = np.array([[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert koleo_loss(torch.tensor(close)).item() == pytest.approx(koleo_reference(close), rel=1e-5)


def test_koleo_on_duplicate_rows_is_finite_and_documents_the_eps_difference():
    """Deliberate difference from KoLeoLoss.forward on exact duplicates (zero distance): ours measures
    ||x_i - x_nn|| (no eps inside), so a duplicate's term is -log(1e-8) with zero gradient; the reference's
    PairwiseDistance gives ||eps * 1|| = sqrt(D) eps, the term -log((sqrt(D) + 1) eps) and a ~1e8 gradient."""
    x = torch.tensor([[1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 0.5, 0.0], [0.0, -1.0, 3.0, 1.0]], requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    unit = x.detach() / x.detach().norm(dim=1, keepdim=True)
    third = -math.log((unit[2] - unit[0]).norm().item() + 1e-8)
    assert loss.item() == pytest.approx((2 * -math.log(1e-8) + third) / 3, rel=1e-5)
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1.0
    reference = (2 * -math.log((math.sqrt(4) + 1) * 1e-8) + third) / 3
    assert koleo_reference(x.detach().numpy()) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("iterations", [1, 3, 7])
def test_sinkhorn_equals_sinkhorn_knopp_teacher(iterations):
    """mirrors dinov2/loss/dino_clstoken_loss.py DINOLoss.sinkhorn_knopp_teacher (and iBOTPatchLoss's, whose
    B is the number of masked patches over all ranks: the rows passed here)."""
    rng = np.random.default_rng(iterations)
    logits = rng.normal(size=(11, 6)) * 0.5
    expected = sinkhorn_reference(logits, 0.1, iterations)
    got = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.1, iterations).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def test_softmax_centering_and_the_running_centre_across_steps():
    """mirrors DINOLoss.softmax_center_teacher / update_center / apply_center_update (and iBOTPatchLoss's):
    targets of step n are softmax((t_n - c_{n-1}) / T); after the step c_n = m c_{n-1} + (1 - m) mean_b t_n
    (the reference applies the pending update lazily at the next softmax_center_teacher: the same lag)."""
    cfg = load_config(None, TINY_DINO + ["objective.dinov2.centering=softmax", "objective.dinov2.center_momentum=0.7"])
    objective = build_objective(cfg)
    rng = np.random.default_rng(5)
    center, patch_center, m, temperature = np.zeros(16), np.zeros(16), 0.7, 0.05
    for step in range(1, 4):
        cls_logits, patch_logits = rng.normal(size=(6, 16)), rng.normal(size=(9 + step, 16))
        got = objective._targets(torch.tensor(cls_logits, dtype=torch.float32), objective.center, "center", temperature)
        got_patch = objective._targets(torch.tensor(patch_logits, dtype=torch.float32), objective.patch_center,
                                       "patch_center", temperature)
        np.testing.assert_allclose(got.double().numpy(), softmax((cls_logits - center) / temperature),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_patch.double().numpy(), softmax((patch_logits - patch_center) / temperature),
                                   rtol=1e-4, atol=1e-6)
        objective.after_step(step)
        center = m * center + (1 - m) * cls_logits.mean(axis=0)
        patch_center = m * patch_center + (1 - m) * patch_logits.mean(axis=0)
        np.testing.assert_allclose(objective.center.double().numpy(), center, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(objective.patch_center.double().numpy(), patch_center, rtol=1e-5, atol=1e-6)
    logits, c = torch.tensor(rng.normal(size=(4, 16))), torch.tensor(rng.normal(size=16))
    np.testing.assert_allclose(softmax_centered(logits, c, 0.04).double().numpy(),
                               softmax((logits.numpy() - c.numpy()) / 0.04), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(batch_center(logits).double().numpy(), logits.numpy().mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_objective_assembles_the_losses_like_ssl_meta_arch(centering):
    """mirrors dinov2/train/ssl_meta_arch.py SSLMetaArch.forward_backward's loss assembly on fixed head
    outputs: teacher targets over all 2B global crops at the step's teacher temperature, the DINO terms
    (global + local, as dinov2_dino_loss), iBOT = forward_masked * 2 * (1/2), KoLeo = sum over the two
    global-crop chunks of the student class tokens, weighted sum of the three."""
    cfg = load_config(None, TINY_DINO + [f"objective.dinov2.centering={centering}",
                                         "objective.dinov2.ibot_loss_weight=0.7",
                                         "objective.dinov2.koleo_loss_weight=0.3"])
    objective = build_objective(cfg)
    d = cfg.objective.dinov2
    rng = np.random.default_rng(6)
    b, k, patches, local = 3, 16, 16, d.local_crops_number
    masks = rng.random((b, 2, patches)) < 0.3
    masks[1, 0] = False
    host = masks.transpose(1, 0, 2).reshape(2 * b, patches)  # crop-major, as the student sees the crops
    m = int(host.sum())
    student_dino = rng.normal(size=((2 + local) * b, k))
    student_ibot, global_cls = rng.normal(size=(m, k)), rng.normal(size=(2 * b, 32))
    teacher_dino, teacher_ibot = rng.normal(size=(2 * b, k)), rng.normal(size=(m, k))
    as32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    objective.teacher.teach = lambda *args: (as32(teacher_dino), as32(teacher_ibot))
    batch = {"global_crops": torch.zeros(b, 2, 1, 32, 32), "local_crops": torch.zeros(b, local, 1, 16, 16),
             "seed": torch.arange(b), "ibot_masks": torch.tensor(masks)}
    step = 2
    global_patches = torch.zeros(2 * b, patches, 32)  # read by Gram anchoring only, which is off
    out = objective(lambda *args: (as32(student_dino), as32(student_ibot), as32(global_cls), global_patches), batch,
                    step)
    temperature = float(np.linspace(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_steps)[step])
    if centering == "sinkhorn":
        targets = sinkhorn_reference(teacher_dino, temperature, d.sinkhorn_iterations)
        patch_targets = sinkhorn_reference(teacher_ibot, temperature, d.sinkhorn_iterations)
    else:  # the centres start at zero
        targets, patch_targets = softmax(teacher_dino / temperature), softmax(teacher_ibot / temperature)
    dino = dinov2_dino_loss(student_dino[:2 * b], np.split(student_dino[2 * b:], local), targets, d.student_temp)
    ibot = ibot_reference(student_ibot, patch_targets, host, d.student_temp)
    koleo = sum(koleo_reference(chunk) for chunk in np.split(global_cls, 2))
    assert float(out.metrics["dino_loss"]) == pytest.approx(dino, rel=1e-5)
    assert float(out.metrics["ibot_loss"]) == pytest.approx(ibot, rel=1e-5)
    assert float(out.metrics["koleo_loss"]) == pytest.approx(koleo, rel=1e-5)
    assert float(out.loss) == pytest.approx(d.dino_loss_weight * dino + 0.7 * ibot + 0.3 * koleo, rel=1e-5)
    assert out.metrics["teacher_temp"] == pytest.approx(temperature)


# ----------------------------------------------------------------------------- iBOT mask statistics

def test_ibot_masks_follow_our_per_crop_rule():
    """Our rule (pretrain/objectives/masking.py ibot_masks), which deliberately differs from
    dinov2/data/collate.py collate_data_and_cast + dinov2/data/masking.py MaskingGenerator: each global crop
    is masked independently with ``probability`` (the reference: exactly int(2B p) crops of a batch, chosen
    by shuffle), a masked crop gets exactly int(r N) patches with r ~ U(ratio range) (the reference:
    int(N U(stratum)) with linspace strata over the range, and MaskingGenerator may place fewer). Checked:
    the masked share and its independence between a sample's two crops (binomial bounds), the exact
    distribution of the masked counts (chi-square against P(int(rN) = k)), and that masks are blocks."""
    samples, grid, (low, high), probability = 1500, (8, 8), (0.1, 0.5), 0.3
    n = grid[0] * grid[1]
    seeds = torch.from_numpy(np.random.default_rng(7).integers(0, 2**62, samples))  # like stable_seed's hashes
    masks = ibot_masks(seeds, 2, grid, (low, high), probability)
    assert masks.shape == (2 * samples, n)
    counts = masks.sum(dim=1).numpy()
    masked = counts > 0  # low * n >= 1: a masked crop has at least one patch
    share, se = masked.mean(), math.sqrt(probability * (1 - probability) / len(masked))
    assert abs(share - probability) < 4.5 * se
    per_sample = masked.reshape(2, samples)  # crop-major
    both = (per_sample[0] & per_sample[1]).mean()
    se_both = math.sqrt(probability ** 2 * (1 - probability ** 2) / samples)
    assert abs(both - probability ** 2) < 4.5 * se_both

    ks = np.arange(n + 1)
    width = np.clip(np.minimum((ks + 1) / n, high) - np.maximum(ks / n, low), 0, None)
    expected = width / (high - low) * masked.sum()
    observed = np.bincount(counts[masked], minlength=n + 1)
    assert observed[expected == 0].sum() == 0  # no count outside int(n * [low, high])
    support = expected > 0
    chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum()
    assert chi2 < stats.chi2.ppf(1 - 1e-4, support.sum() - 1), chi2

    blocks = masks[torch.from_numpy(masked)].view(-1, *grid).float()
    pad = torch.nn.functional.pad(blocks, (1, 1, 1, 1))
    neighbour = (pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]) > 0
    assert (neighbour & (blocks > 0)).sum() / blocks.sum() > 0.95  # random masking of this density: ~0.7
