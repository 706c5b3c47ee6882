"""ViT encoder, attention backends and position embeddings."""
import pytest
import torch

from pretrain.backbone import bind_kernels, build_vit
from pretrain.config import ModelConfig
from pretrain.models import VIT_PRESETS
from pretrain.models.attention import (BlockDiagonal, attention, reference_attention, resolve_backend,
                                       xformers_available)
from pretrain.models.pos_embed import resample_2d, sincos_2d


def test_sdpa_matches_reference():
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    assert torch.allclose(attention(q, k, v, "sdpa"), reference_attention(q, k, v), atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_xformers_request_fails_clearly(caplog):
    import logging

    from pretrain.models import attention as attention_module

    attention_module._announced.clear()
    with caplog.at_level(logging.INFO, logger="pretrain.models.attention"):
        assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
        assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert [r.getMessage() for r in caplog.records] == ["attention backend auto -> sdpa on cpu"]  # said once
    why = "kernels need a CUDA device" if xformers_available() else "not installed"
    with pytest.raises(RuntimeError, match=f"attention backend 'xformers' cannot run: xformers {why}"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("flash", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
def test_xformers_matches_reference_on_gpu():
    q, k, v = torch.randn(3, 2, 4, 64, 32, device="cuda").unbind(0)
    assert torch.allclose(attention(q, k, v, "xformers"), reference_attention(q, k, v), atol=1e-3)


def test_block_diagonal_attention_keeps_each_packed_sequence_to_itself():
    lengths = [5, 3, 7]
    q, k, v = torch.randn(3, 1, 2, sum(lengths), 8).unbind(0)
    packed = BlockDiagonal(lengths)
    allowed = packed.dense(q.device)
    assert allowed.sum() == sum(n * n for n in lengths)
    torch.testing.assert_close(attention(q, k, v, "sdpa", packed), reference_attention(q, k, v, allowed))
    alone = [attention(*(t[:, :, start:start + n] for t in (q, k, v)), "sdpa")
             for start, n in zip([0, 5, 8], lengths)]
    torch.testing.assert_close(attention(q, k, v, "sdpa", packed), torch.cat(alone, dim=2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [0, 1])
def test_packed_crops_give_the_outputs_and_gradients_of_separate_passes(checkpointing):
    """DINOv2's global (16 patches) and local (4 patches) crops in one packed pass (sdpa with the dense
    block-diagonal mask here; xformers' BlockDiagonalMask on GPUs) equal two passes."""
    torch.manual_seed(0)
    vit = tiny(ffn="swiglu", num_registers=1, activation_checkpointing=checkpointing)
    globals_, locals_ = torch.randn(4, 1, 32, 32), torch.randn(6, 1, 16, 16)
    results = {}
    for pack in ("never", "always"):
        vit.zero_grad()
        outputs = vit.forward_tokens_many([vit.embed_patches(globals_), vit.embed_patches(locals_)], pack)
        sum((out * torch.linspace(-1, 1, out.shape[-1])).square().mean() for out in outputs).backward()
        results[pack] = outputs, {n: p.grad.clone() for n, p in vit.named_parameters()}
    for packed, separate in zip(results["always"][0], results["never"][0]):
        assert packed.shape == separate.shape
        torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-5)
    for name, grad in results["never"][1].items():
        torch.testing.assert_close(results["always"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not xformers_available(), reason="needs xformers installed")
def test_xformers_swiglu_op_computes_our_swiglu():
    """xformers' SwiGLU op (its CPU fallback here, the fused kernel on GPUs) on fc1's two halves."""
    from pretrain.models.blocks import SwiGLU, swiglu

    torch.manual_seed(0)
    ffn = SwiGLU(32, 40, backend="sdpa")
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(swiglu(x, ffn.fc1, ffn.fc2, "xformers"), ffn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
def test_packed_xformers_pass_matches_separate_passes_on_gpu():
    torch.manual_seed(0)
    vit = tiny(ffn="swiglu", attn_backend="xformers").cuda()
    bind_kernels(vit, torch.device("cuda"), torch.float32)
    groups = [vit.embed_patches(torch.randn(4, 1, 32, 32, device="cuda")),
              vit.embed_patches(torch.randn(6, 1, 16, 16, device="cuda"))]
    for packed, separate in zip(vit.forward_tokens_many(groups, "auto"), vit.forward_tokens_many(groups, "never")):
        torch.testing.assert_close(packed, separate, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", sorted(VIT_PRESETS))
def test_presets_build_with_their_widths(size):
    dim, depth, heads, _ = VIT_PRESETS[size]
    with torch.device("meta"):
        vit = build_vit(ModelConfig(size=size, img_size=224, patch_size=14 if size in "Hg" else 16))
    assert (vit.embed_dim, len(vit.blocks), vit.num_heads) == (dim, depth, heads)


def tiny(**kw):
    args = dict(size="tiny", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, in_chans=1)
    args.update(kw)
    return build_vit(ModelConfig(**args))


def test_forward_shapes_with_registers_and_layer_scale():
    vit = tiny(num_registers=4, layer_scale_init=1e-5, drop_path=0.1)
    out = vit(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 1 + 4 + 16, 32)
    names = dict(vit.named_parameters())
    assert "reg_token" in names and "blocks.0.ls1.gamma" in names and "pos_embed" not in names


def test_multichannel_input():
    vit = tiny(in_chans=3)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)
    with pytest.raises(ValueError, match="3-channel"):
        vit(torch.randn(1, 1, 32, 32))


def test_other_image_sizes_get_resampled_positions():
    vit = tiny().eval()
    assert vit(torch.randn(1, 1, 48, 48)).shape == (1, 1 + 36, 32)
    same = resample_2d(sincos_2d(32, 4, 4), (4, 4), (4, 4))
    assert torch.equal(same, sincos_2d(32, 4, 4))
    assert resample_2d(sincos_2d(32, 4, 4), (4, 4), (6, 6)).shape == (36, 32)


def test_sincos_is_distinct_per_position():
    pos = sincos_2d(64, 4, 4)
    assert pos.shape == (16, 64)
    assert torch.cdist(pos, pos).fill_diagonal_(1.0).min() > 0.1


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(every):
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    results, calls = [], []
    for k in (0, every):
        torch.manual_seed(0)
        vit = tiny(depth=3, drop_path=0.2, activation_checkpointing=k)
        counts = [0] * 3
        for index, block in enumerate(vit.blocks):
            block.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
        torch.manual_seed(1)  # the same drop-path draws in both
        vit(images).square().mean().backward()
        results.append({n: p.grad.clone() for n, p in vit.named_parameters()})
        calls.append(counts)
    for name, grad in results[0].items():
        assert torch.allclose(grad, results[1][name], atol=1e-6), name
    assert calls[0] == [1, 1, 1]  # checkpointed blocks run again in backward
    assert calls[1] == ([2, 2, 2] if every == 1 else [2, 1, 2])


@pytest.mark.parametrize("registers, layer_scale", [(0, 0.0), (2, 0.1)])
def test_swiglu_encoder_exports_with_timm_and_transformers_parity(registers, layer_scale, tmp_path):
    import json

    from safetensors.torch import save_file

    from pretrain.config import load_config
    from pretrain.export import timm_config, timm_state_dict
    from pretrain.export_hf import verify, write_hf

    cfg = load_config(None, ["model.ffn=swiglu", "model.embed_dim=32", "model.num_heads=2", "model.img_size=32",
                             "model.patch_size=8", f"model.num_registers={registers}",
                             f"model.layer_scale_init={layer_scale}"])
    encoder = build_vit(cfg.model).eval()
    assert encoder.blocks[0].mlp.fc1.out_features == 2 * 88  # 2/3 of 32 * 4, rounded up to 8, packed
    save_file(timm_state_dict(encoder), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(timm_config(cfg.model, encoder)))
    write_hf(encoder, str(tmp_path))
    report = verify(str(tmp_path), encoder)
    assert report["timm"] < 1e-5 and report["transformers"] < 1e-4


def test_extra_stems_share_the_trunk_get_zero_gradients_when_unused_and_export_as_a_plain_vit():
    from pretrain.objectives.base import embed_every_stem

    encoder = tiny(in_chans=1, stems={"ct": 3, "pathology": 3})
    encoder.train()
    encoder.forward_tokens(embed_every_stem(encoder, torch.randn(2, 1, 32, 32))).sum().backward()  # X-ray: main stem
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    for stem in encoder.stems.values():  # present (DeepSpeed reduces every gradient) and exactly zero
        assert stem.proj.weight.grad is not None and not stem.proj.weight.grad.any()
    encoder.eval()
    slabs = torch.randn(2, 3, 32, 32)
    plain = encoder.with_stem("ct")
    assert plain.stems is None and plain.in_chans == 3
    assert set(plain.state_dict()) == set(tiny(in_chans=3).state_dict())
    torch.testing.assert_close(plain(slabs), encoder(slabs, stem="ct"), rtol=0, atol=0)
    assert encoder.stems is not None  # the copy left the original alone
    with pytest.raises(ValueError, match="3-channel"):
        encoder(torch.randn(2, 1, 32, 32), stem="pathology")


def test_drop_path_in_a_packed_row_drops_whole_sequences():
    from pretrain.models.blocks import DropPath

    torch.manual_seed(0)
    lengths = [4] * 20 + [2] * 30
    drop = DropPath(0.5).train()
    out = drop(torch.ones(1, sum(lengths), 3), BlockDiagonal(lengths))
    kept = [float(chunk.mean()) for chunk in out[0].split(lengths)]
    assert set(kept) == {0.0, 2.0}  # each sequence kept whole (scaled by 1 / (1 - p)) or dropped whole
    assert all(chunk.unique().numel() == 1 for chunk in out[0].split(lengths))
    assert 10 < kept.count(0.0) < 40


def test_kernels_are_bound_once_for_the_training_device_and_the_forward_decides_nothing(monkeypatch):
    from pretrain.config import load_config
    from pretrain.models import attention as attention_module

    cfg = load_config(None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.ffn=swiglu"])
    model = build_vit(cfg.model).eval()
    images = torch.randn(2, 1, 32, 32)
    unbound = model(images)
    assert bind_kernels(model, torch.device("cpu"), torch.float32) == {"attention": "sdpa", "SwiGLU": "sdpa"}
    assert {block.attn.kernel for block in model.blocks} == {"sdpa"}
    for module, name in ((attention_module, "resolve_backend"), (attention_module, "choose_kernel"),
                         (attention_module, "attention")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("decided in the forward"))
    torch.testing.assert_close(model(images), unbound)


def test_xformers_without_an_operator_for_the_inputs_falls_back_to_sdpa_once_or_is_an_error(monkeypatch, caplog):
    from pretrain.models import attention as attention_module

    monkeypatch.setattr(attention_module, "resolve_backend", lambda backend, device: "xformers")
    monkeypatch.setattr(attention_module, "xformers_refusal", lambda device, dtype, head_dim: "no operator found")
    attention_module._announced.clear()
    with caplog.at_level("WARNING", logger="pretrain.models.attention"):
        for _ in range(2):
            assert attention_module.choose_kernel("auto", torch.device("cpu"), torch.bfloat16, 96) == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "attention: xformers has no operator for head dim 96 in torch.bfloat16 (no operator found): sdpa"]
    with pytest.raises(RuntimeError, match="no operator for head dim 96 in torch.bfloat16"):
        attention_module.choose_kernel("xformers", torch.device("cpu"), torch.bfloat16, 96)


def test_every_stem_runs_in_one_order_whatever_the_source():
    """ZeRO-3 prefetches by the module order of the first steps: it must not change with the batch's source."""
    from pretrain.config import load_config
    from pretrain.objectives.base import embed_every_stem

    cfg = load_config(None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.stems={ct: 3}"])
    model = build_vit(cfg.model).train()
    order = []
    for name, module in [("patch_embed", model.patch_embed), *model.stems.items()]:
        module.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
    runs = {}
    for stem, chans in ((None, 1), ("ct", 3)):
        order.clear()
        embed_every_stem(model, torch.randn(2, chans, 32, 32), stem=stem).sum().backward()
        runs[stem] = list(order)
    assert runs[None] == runs["ct"] == ["patch_embed", "ct"]
