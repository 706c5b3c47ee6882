"""Hi-End-MAE's hierarchical decoder (objective.mae / objective.videomae decoder=hierarchical): the encoder depths
it reads, its shapes, where its cross-attention keys come from, and an encoder exported in the light decoder's
format."""
import math
import os

import pytest
import torch

from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.models.attention import reference_attention
from pretrain.objectives import build_objective
from pretrain.objectives.hiend import CrossAttention, tap_depths
from tests.conftest import REPO, TINY, metric_history, run_pretrain
from tests.test_videomae import TINY_VIDEO

HIER_2D = TINY + ["model.depth=4", "objective.mae.decoder=hierarchical", "objective.mae.decoder_depth=2"]
HIER_CT = [o for o in TINY_VIDEO if not o.startswith(("data.modality", "model.in_chans", "data.transforms"))] + [
    "data.modality=ct", "model.in_chans=1", "model.frames=16", "model.tubelet_size=4", "model.depth=4",
    "objective.videomae.decoder=hierarchical", "objective.videomae.decoder_layers=[1,3,4]"]


def test_default_depths_are_four_evenly_spaced_ending_at_the_last_block():
    assert tap_depths(12) == [3, 6, 9, 12]  # Hi-End-MAE's ViT-B
    assert tap_depths(24) == [6, 12, 18, 24] and tap_depths(40) == [10, 20, 30, 40]
    assert tap_depths(2) == [1, 2]  # fewer blocks than taps: each block once
    assert tap_depths(12, [4, 12]) == [4, 12]


@pytest.mark.parametrize("layers", ["[3,6]", "[6,3,12]", "[0,12]", "[12]", "[3,3,12]", "[3,13]"])
def test_depths_outside_the_encoder_or_out_of_order_are_refused(layers):
    with pytest.raises(ConfigError, match=r"objective\.mae\.decoder_layers"):
        load_config(None, TINY + ["model.depth=12", "objective.mae.decoder=hierarchical",
                                  f"objective.mae.decoder_layers={layers}"])
    assert load_config(None, TINY + ["model.depth=12", f"objective.mae.decoder_layers={layers}"])  # light: unused


def test_cross_attention_is_softmax_of_decoder_queries_over_encoder_keys():
    torch.manual_seed(0)
    layer = CrossAttention(16, 4)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    w, b = layer.qkv.weight, layer.qkv.bias
    heads = lambda t: t.reshape(2, -1, 4, 4).transpose(1, 2)  # noqa: E731 - [B, N, 16] -> [B, 4, N, 4]
    q, k, v = heads(x @ w[:16].T + b[:16]), heads(y @ w[16:32].T + b[16:32]), heads(y @ w[32:].T + b[32:])
    expected = layer.proj(reference_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(layer(x, y), expected, rtol=1e-5, atol=1e-5)


def captured_reads(objective, model, batch):
    """Run ``objective`` once; returns ({depth: encoder block output}, [(cross block index, its keys' input)])."""
    blocks, reads, hooks = {}, [], []
    for index, block in enumerate(model.encoder.blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, d=index + 1: blocks.__setitem__(d, out)))
    for index, block in enumerate(model.hierarchy.cross_blocks):
        hooks.append(block.cross_attn.register_forward_hook(lambda m, a, out, i=index: reads.append((i, a[1]))))
    out = objective(model, batch, step=0)
    for hook in hooks:
        hook.remove()
    return out, blocks, reads


@pytest.mark.parametrize("view", ["2d", "ct"])
def test_cross_attention_keys_come_from_the_configured_encoder_layers_deep_to_shallow(view):
    torch.manual_seed(0)
    objective = build_objective(load_config(None, HIER_2D if view == "2d" else HIER_CT))
    model = objective.trainable()
    hierarchy = model.hierarchy
    expected = [3, 2, 1] if view == "2d" else [3, 1]  # 2d: default taps of 4 blocks [1, 2, 3, 4]; ct: [1, 3, 4]
    assert hierarchy.read_order() == expected and len(hierarchy.cross_blocks) == len(expected)
    batch = ({"image": torch.randn(2, 1, 32, 32), "seed": torch.arange(2)} if view == "2d" else
             {"volume": torch.randn(2, 1, 16, 32, 32), "seed": torch.arange(2)})
    out, blocks, reads = captured_reads(objective, model, batch)
    assert [i for i, _ in reads] == list(range(len(expected)))  # every cross block ran once, in order
    for (i, keys), depth in zip(reads, expected):
        torch.testing.assert_close(keys, hierarchy.layer_proj[i](blocks[depth]))  # visible tokens of that block
        assert keys.shape[1] == blocks[4].shape[1] < model.encoder.num_patches  # visible ones only, prefix in
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for i in range(len(expected)):
        assert hierarchy.layer_proj[i].weight.grad.abs().sum() > 0
    shallow = model.encoder.blocks[expected[-1] - 1].mlp.fc2.weight.grad  # reached through the decoder too
    assert shallow is not None and shallow.abs().sum() > 0


def test_hierarchical_objective_predicts_what_the_light_one_does_and_keeps_the_encoder_format():
    torch.manual_seed(0)
    light = build_objective(load_config(None, TINY + ["model.depth=4", "objective.mae.decoder_depth=2"]))
    torch.manual_seed(0)
    hier = build_objective(load_config(None, HIER_2D))
    batch = {"image": torch.randn(3, 1, 32, 32), "seed": torch.arange(3)}
    a, b = light(light.trainable(), batch, 0), hier(hier.trainable(), batch, 0)
    assert a.visuals["pred"].shape == b.visuals["pred"].shape and torch.equal(a.visuals["mask"], b.visuals["mask"])
    light_encoder, hier_encoder = light.encoder().state_dict(), hier.encoder().state_dict()
    assert list(light_encoder) == list(hier_encoder)  # the export reads the encoder only
    assert all(torch.equal(light_encoder[k], hier_encoder[k]) for k in light_encoder)  # same draws for it
    added = set(hier.trainable().state_dict()) - set(light.trainable().state_dict())
    assert added and all(name.startswith("hierarchy.") for name in added)
    hier.render(batch, b)  # the reconstruction image works as for the light decoder


@pytest.mark.slow
def test_tiny_ct_run_on_two_processes_under_zero3_trains_and_exports_the_light_format(ct_shards, tmp_path):
    from safetensors.torch import load_file

    from pretrain.export import timm_state_dict

    overrides = ["objective.videomae.decoder=hierarchical", "model.depth=4"]
    run_pretrain(["train", "--nproc", "2", "--config", os.path.join(REPO, "pretrain", "configs",
                                                                     "videomae_v2_tiny_ct_cpu.yaml"),
                  f"data.shards={ct_shards}", f"output_dir={tmp_path}", "name=run", "train.steps=6",
                  "checkpoint.every=6", "data.batch_size=2", "train.log_every=1", "tracking.system_metrics=false",
                  "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0", *overrides])
    run = os.path.join(str(tmp_path), "run")
    losses = metric_history(run)
    assert [step for step, _ in losses] == list(range(1, 7)) and all(math.isfinite(v) for _, v in losses)
    assert losses[-1][1] < losses[0][1]
    result = run_pretrain(["export", run, "--verify"])
    assert "pretrain.models.vit.VisionTransformer" in result.stdout
    exported = load_file(os.path.join(run, "exports", "step_000006", "model.safetensors"))
    light = build_objective(load_config(os.path.join(REPO, "pretrain", "configs", "videomae_v2_tiny_ct_cpu.yaml"),
                                        ["model.depth=4"]))
    expected = timm_state_dict(light.encoder())
    assert sorted(exported) == sorted(expected)
    assert all(exported[k].shape == expected[k].shape for k in expected)
