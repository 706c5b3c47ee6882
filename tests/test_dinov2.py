"""DINOv2 pieces in one process: losses against independent formulas, Sinkhorn-Knopp margins (also split
over two real processes), iBOT masks, heads, schedules, the EMA teacher and the multi-crop views."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from data_pipeline.photometric import colour_mode, stain_jitter
from data_pipeline.views import MultiCropView
from pretrain import dist
from pretrain.config import load_config
from pretrain.models.heads import DINOHead
from pretrain.objectives import DataSpec, build_objective
from pretrain.objectives.dino_losses import (batch_center, dino_loss, entropy, ibot_loss, koleo_loss,
                                             sinkhorn_knopp, softmax_centered)
from pretrain.objectives.dinov2 import teacher_temperatures
from pretrain.objectives.masking import block_mask, ibot_masks
from pretrain.optim import build_optimizer, build_scheduler

TINY_DINO = [
    "objective.name=dinov2", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32",
    "model.patch_size=8", "objective.dinov2.head_prototypes=64", "objective.dinov2.head_hidden_dim=32",
    "objective.dinov2.head_bottleneck_dim=16", "objective.dinov2.local_crops_number=2",
    "objective.dinov2.local_crops_size=16", "train.steps=10",
]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_dino_loss_matches_an_explicit_sum_over_cross_view_pairs():
    rng = np.random.default_rng(0)
    student = [rng.normal(size=(3, 5)) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [softmax(rng.normal(size=(3, 5))) for _ in range(2)]
    tau = 0.1
    expected, pairs = 0.0, 0
    for s in range(4):
        for t in range(2):
            if s == t:
                continue
            log_p = np.log(softmax(student[s] / tau))
            expected += np.mean([-(teacher[t][b] * log_p[b]).sum() for b in range(3)])
            pairs += 1
    got = dino_loss([torch.tensor(x) for x in student], [torch.tensor(x) for x in teacher], tau)
    assert pairs == 6 and got.item() == pytest.approx(expected / pairs, rel=1e-6)


def test_ibot_loss_weights_each_image_once_and_divides_by_all_images():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(5, 4)), softmax(rng.normal(size=(5, 4)))
    owner = [0, 0, 0, 2, 2]  # 3 masked patches of image 0, 2 of image 2, image 1 unmasked
    weights = np.array([1 / owner.count(o) for o in owner])
    ce = [-(t[i] * np.log(softmax(s[i] / 0.1))).sum() for i in range(5)]
    expected = (np.mean(ce[:3]) + np.mean(ce[3:])) / 3
    got = ibot_loss(torch.tensor(s), torch.tensor(t), torch.tensor(weights), 3, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert ibot_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0), 3, 0.1).item() == 0.0


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    x = torch.randn(7, 6, dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    distances = torch.cdist(unit, unit) + torch.eye(7, dtype=torch.float64) * 10
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    assert koleo_loss(x).item() == pytest.approx(expected.item(), rel=1e-5)
    spread, clumped = torch.eye(4), torch.eye(4) + 5.0  # spread-out features score lower
    assert koleo_loss(spread) < koleo_loss(clumped)


def test_sinkhorn_rows_sum_to_one_and_prototypes_share_the_mass():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    q = sinkhorn_knopp(logits, 0.1, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-3)
    few = sinkhorn_knopp(logits, 0.1, iterations=3)  # the default rounds: samples exact, prototypes evener
    assert torch.allclose(few.sum(dim=1), torch.ones(64), atol=1e-5)
    plain = torch.softmax(logits / 0.1, dim=1)
    assert few.sum(dim=0).std() < plain.sum(dim=0).std()


def test_softmax_centering_and_batch_center():
    logits, center = torch.randn(4, 6), torch.randn(6)
    expected = torch.softmax((logits - center) / 0.05, dim=-1)
    assert torch.allclose(softmax_centered(logits, center, 0.05), expected)
    assert torch.allclose(batch_center(logits), logits.mean(0))
    uniform = torch.full((3, 8), 1 / 8)
    assert entropy(uniform).item() == pytest.approx(math.log(8))


def _sinkhorn_worker(rank, port, logits, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    halves = (logits[:5], logits[5:])  # uneven: 5 and 7 samples
    q = sinkhorn_knopp(halves[rank], 0.1, 3, dist.all_reduce_tensor)
    center = batch_center(halves[rank], dist.all_reduce_tensor)
    out[rank] = (q, center)
    tdist.destroy_process_group()


def test_sinkhorn_and_center_over_two_processes_equal_one_process_on_the_whole_batch():
    logits = torch.randn(12, 10)
    out = mp.Manager().dict()
    mp.spawn(_sinkhorn_worker, args=(dist.free_port(), logits, out), nprocs=2)
    whole = sinkhorn_knopp(logits, 0.1, 3)
    assert torch.allclose(torch.cat([out[0][0], out[1][0]]), whole, atol=1e-6)
    assert torch.allclose(out[0][1], logits.mean(0), atol=1e-6) and torch.allclose(out[1][1], out[0][1])


def test_block_masks_have_the_drawn_size_and_follow_the_seed():
    gen = torch.Generator().manual_seed(0)
    for masked in (0, 1, 5, 13, 30, 49):
        assert int(block_mask(7, 7, masked, gen).sum()) == masked
    seeds = torch.arange(200, dtype=torch.int64) * 7919
    masks = ibot_masks(seeds, 2, (8, 8), (0.1, 0.5), 0.5)
    assert masks.shape == (400, 64)
    ratios = masks.float().mean(1)
    masked = ratios > 0
    assert 0.35 < masked.float().mean() < 0.65  # the mask probability
    assert (ratios[masked] >= 0.1 - 1 / 64).all() and (ratios[masked] <= 0.5 + 1 / 64).all()
    assert torch.equal(masks, ibot_masks(seeds, 2, (8, 8), (0.1, 0.5), 0.5))


def test_dino_head_gives_cosine_logits_and_names_its_prototype_layer():
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, layers=3)
    logits = head(torch.randn(5, 8) * 100)
    assert logits.shape == (5, 32) and logits.abs().max() <= 1.0 + 1e-5
    assert "last_layer.weight" in dict(head.named_parameters())


def test_schedules_freeze_the_last_layer_and_move_weight_decay_temperature_and_momentum():
    cfg = load_config(None, TINY_DINO + ["optim.freeze_last_layer_steps=3", "optim.weight_decay=0.04",
                                         "optim.weight_decay_end=0.4", "optim.warmup_steps=0",
                                         "optim.patch_embed_lr_mult=0.2"])
    objective = build_objective(cfg)
    optimizer = build_optimizer(objective.trainable(), cfg.optim, 2)
    schedule = build_scheduler(optimizer, cfg.optim, 10)
    last = [g for g in optimizer.param_groups if g["last_layer"]]
    stem = [g for g in optimizer.param_groups if g["lr_scale"] == pytest.approx(0.2)]
    assert last and stem
    for step in range(10):
        assert all((g["lr"] == 0.0) == (step < 3) for g in last)
        schedule.step()
    decayed = [g for g in optimizer.param_groups if g["wd_scale"]]
    assert decayed and all(g["weight_decay"] == pytest.approx(0.4) for g in decayed)
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if not g["wd_scale"])
    temps = teacher_temperatures(cfg.objective.dinov2, 100)
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07) and temps[-1] == pytest.approx(0.07)
    assert objective.momentum[0] == pytest.approx(0.992) and objective.momentum[-1] == pytest.approx(1.0)


def test_ema_update_is_exact_and_the_optimizer_never_sees_the_teacher():
    cfg = load_config(None, TINY_DINO)
    objective = build_objective(cfg)
    student, teacher = objective.trainable(), objective.teacher
    optimizer = build_optimizer(student, cfg.optim, 2)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(2.0)
        for p in teacher.parameters():
            p.fill_(1.0)
    objective.after_step(1)
    m = objective.momentum[0]
    for name, p in teacher.named_parameters():
        assert torch.allclose(p, torch.full_like(p, m * 1.0 + (1 - m) * 2.0), rtol=0, atol=1e-7), name
    spec = objective.data_spec()
    batch = {"global_crops": torch.randn(4, 2, 1, 32, 32), "local_crops": torch.randn(4, 2, 1, 16, 16),
             "seed": torch.arange(4, dtype=torch.int64)}
    out = objective(student, batch, 0)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert spec.kind == "multicrop" and out.metrics["prototypes_used"] >= 1
    assert {"dino_loss", "ibot_loss", "koleo_loss", "teacher_temp", "teacher_entropy"} <= set(out.metrics)


def test_objective_state_round_trip_restores_teacher_and_centres():
    cfg = load_config(None, TINY_DINO + ["objective.dinov2.centering=softmax"])
    first, second = build_objective(cfg), build_objective(load_config(None, TINY_DINO + ["seed=1"]))
    first.center += 3.0
    second.load_state_dict(first.state_dict())
    for (name, a), b in zip(first.teacher.state_dict().items(), second.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(second.center, first.center)


def test_multicrop_view_shapes_and_reproducibility(tmp_path):
    spec = DataSpec("multicrop", 32, 1, global_scale=(0.32, 1.0), local_crops=3, local_size=16)
    cfg = load_config(None, []).data.transforms
    view = MultiCropView(spec, cfg, "xray")
    image = torch.rand(1, 60, 50)
    a = view(image, torch.Generator().manual_seed(5), "x")
    b = view(image, torch.Generator().manual_seed(5), "x")
    assert a["global_crops"].shape == (2, 1, 32, 32) and a["local_crops"].shape == (3, 1, 16, 16)
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert not torch.equal(a["global_crops"][0], a["global_crops"][1])


def test_colour_modes_by_modality_and_stain_jitter():
    assert colour_mode("auto", "xray", 1) == "intensity" and colour_mode("auto", "pathology", 3) == "stain"
    assert colour_mode("auto", "other", 3) == "rgb" and colour_mode("none", "pathology", 3) == "none"
    tile = torch.rand(3, 8, 8) * 0.8 + 0.1
    same = stain_jitter(tile, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(same, tile, atol=1e-4)  # sigma 0: deconvolution and back is the identity
    moved = stain_jitter(tile, 0.2, torch.Generator().manual_seed(0))
    assert moved.shape == tile.shape and not torch.allclose(moved, tile, atol=1e-3)
    assert moved.min() >= 0 and moved.max() <= 1


def test_class_attention_is_a_distribution_over_patches():
    cfg = load_config(None, TINY_DINO)
    encoder = build_objective(cfg).teacher.encoder
    weights = encoder.class_attention(torch.randn(2, 1, 32, 32))
    assert weights.shape == (2, 2, 16) and (weights >= 0).all() and (weights.sum(-1) <= 1 + 1e-5).all()


def test_packed_student_pass_gives_the_losses_and_gradients_of_two_passes():
    """objective.dinov2.pack_crops=always (sdpa with the block-diagonal mask) vs never (global, then local)."""
    batch = {"global_crops": torch.randn(4, 2, 1, 32, 32, generator=torch.Generator().manual_seed(1)),
             "local_crops": torch.randn(4, 2, 1, 16, 16, generator=torch.Generator().manual_seed(2)),
             "seed": torch.arange(4, dtype=torch.int64)}
    results = {}
    for pack in ("never", "always"):
        torch.manual_seed(0)
        objective = build_objective(load_config(None, TINY_DINO + [f"objective.dinov2.pack_crops={pack}",
                                                                   "model.drop_path=0.0"]))
        student = objective.trainable()
        out = objective(student, batch, 0)
        out.loss.backward()
        results[pack] = out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    (packed, packed_grads), (separate, separate_grads) = results["always"], results["never"]
    for name in ("dino_loss", "ibot_loss", "koleo_loss"):
        assert float(packed.metrics[name]) == pytest.approx(float(separate.metrics[name]), rel=1e-5), name
    assert packed_grads.keys() == separate_grads.keys()
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
