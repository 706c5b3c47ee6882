"""Parameter groups and learning-rate schedule."""
import pytest

from pretrain.config import OptimConfig, load_config
from pretrain.objectives import build_objective
from pretrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from tests.conftest import TINY


def mae_model(extra=()):
    return build_objective(load_config(None, TINY + list(extra))).trainable()


def test_no_decay_on_norms_biases_positions_and_tokens():
    groups = param_groups(mae_model(["model.num_registers=2"]), weight_decay=0.05, layer_decay=1.0, depth=2)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert {"encoder.cls_token", "encoder.reg_token", "mask_token", "encoder.norm.weight",
            "encoder.blocks.0.attn.qkv.bias"} <= no_decay
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert not no_decay & decay


def test_layer_decay_scales_lower_layers():
    groups = param_groups(mae_model(), weight_decay=0.05, layer_decay=0.5, depth=2)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.125)
    assert scale["encoder.blocks.0.mlp.fc1.weight"] == pytest.approx(0.25)
    assert scale["encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["decoder_pred.weight"] == 1.0


def test_warmup_then_cosine_to_min():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 10, 100, 0.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_scales_every_group():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=2, layer_decay=0.5)
    optimizer = build_optimizer(mae_model(), cfg, depth=2)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    first = [g["lr"] for g in optimizer.param_groups]
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2 * lr for lr in first])
