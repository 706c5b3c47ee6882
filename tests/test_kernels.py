"""Kernel choice: apex where it can run, PyTorch's fused kernels otherwise; clear errors on request."""
import logging

import pytest
import torch

from pretrain import kernels
from pretrain.backbone import build_vit
from pretrain.config import ConfigError, load_config
from pretrain.models.norm import layer_norm
from pretrain.optim import build_optimizer
from tests.system_deps import require

APEX_RUNS = kernels.apex_runs()[0]


@pytest.mark.skipif(APEX_RUNS, reason="apex can run here: auto picks it")
def test_auto_falls_back_to_pytorch_and_says_so_once(caplog):
    kernels._announced.clear()
    cfg = load_config(None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8"])
    with caplog.at_level(logging.INFO, logger="pretrain.kernels"):
        model = build_vit(cfg.model)
        build_vit(cfg.model)
        optimizer = build_optimizer(model, cfg.optim, depth=2)
    assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm) and isinstance(model.norm, torch.nn.LayerNorm)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("LayerNorm: torch LayerNorm") == 1 and "optimizer: torch AdamW (fused kernel)" in messages


@pytest.mark.skipif(APEX_RUNS, reason="apex can run here")
@pytest.mark.parametrize("override, setting", [("model.norm_impl=apex", "model.norm_impl"),
                                               ("optim.impl=apex", "optim.impl")])
def test_apex_on_request_without_apex_is_a_clear_error(override, setting):
    cfg = load_config(None, [override, "model.size=tiny", "model.img_size=32", "model.patch_size=8"])
    with pytest.raises(ConfigError, match=f"{setting}=apex: .*NVIDIA apex is not on PyPI.*github.com/NVIDIA/apex"):
        build_optimizer(build_vit(cfg.model), cfg.optim, depth=2)


def test_lamb_needs_apex_and_unknown_kernels_are_refused():
    if not APEX_RUNS:
        cfg = load_config(None, ["optim.name=lamb", "optim.impl=torch"])
        with pytest.raises(ConfigError, match="optim.name=lamb needs apex's FusedLAMB"):
            build_optimizer(torch.nn.Linear(2, 2), cfg.optim, depth=0)
    with pytest.raises(ConfigError, match="model.norm_impl='fused' is not one of"):
        load_config(None, ["model.norm_impl=fused"])


def test_fused_adamw_takes_the_same_steps_as_the_reference_loop():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_(True) for w in weights]
    fused = torch.optim.AdamW(weights, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    plain = torch.optim.AdamW(twins, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, foreach=False)
    for step in range(5):
        for params, optimizer in ((weights, fused), (twins, plain)):
            optimizer.zero_grad()
            ((params[0] @ params[1]).sin().sum() * (step + 1)).backward()
            optimizer.step()
    for got, expected in zip(weights, twins):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not APEX_RUNS, reason="needs NVIDIA apex and a CUDA device")
def test_apex_layer_norm_and_adam_match_pytorch_on_the_gpu():
    torch.manual_seed(0)
    x = torch.randn(4, 197, 768, device="cuda")
    fused, plain = layer_norm(768, 1e-6, "apex").cuda(), torch.nn.LayerNorm(768, eps=1e-6).cuda()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    weights = [torch.randn(256, 256, device="cuda", requires_grad=True)]
    twins = [weights[0].detach().clone().requires_grad_(True)]
    apex_adam = kernels.fused_optimizer([{"params": weights, "weight_decay": 0.05}], 1e-3, (0.9, 0.95), "adamw", "apex")
    torch_adam = kernels.fused_optimizer([{"params": twins, "weight_decay": 0.05}], 1e-3, (0.9, 0.95), "adamw", "torch")
    for params, optimizer in ((weights, apex_adam), (twins, torch_adam)):
        (params[0].sin().sum()).backward()
        optimizer.step()
    torch.testing.assert_close(weights[0], twins[0], rtol=1e-5, atol=1e-5)


def test_compiled_blocks_give_the_eager_outputs_and_gradients_and_keep_their_names():
    from pretrain.backbone import compile_blocks

    require("g++")  # inductor compiles the blocks' kernels with it

    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.ffn=swiglu"])
    model = build_vit(cfg.model)
    names = list(model.state_dict())
    images = torch.randn(4, 1, 32, 32)
    eager = model(images)
    eager.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    assert compile_blocks(model, "inductor") == 2
    compiled = model(images)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert list(model.state_dict()) == names


def test_compile_under_zero3_is_refused():
    with pytest.raises(ConfigError, match="model.compile=true with distributed.zero_stage=3"):
        load_config(None, ["model.compile=true", "distributed.zero_stage=3"])


def test_a_login_node_plans_a_run_configured_for_cluster_kernels():
    """apex, explicit xformers and compile are the GPU nodes' business: planning (and export) rebuild the
    model with portable kernels, and the run's own config is left as it was."""
    from launch.profiles import load_profile
    from pretrain.plan import build_plan

    cfg = load_config("pretrain/configs/mae_vit_xray.yaml", ["model.norm_impl=apex", "optim.impl=apex",
                                                             "model.attn_backend=xformers", "model.compile=true"])
    plan = build_plan(cfg, load_profile("clusters/node_8x80gb.yaml"), deepspeed_estimates=False)
    assert plan["counts"]["trainable"] > 100e6 and plan["fits"]
    assert (cfg.model.norm_impl, cfg.model.attn_backend, cfg.model.compile) == ("apex", "xformers", True)


def test_apex_without_its_cuda_extensions_is_not_chosen(tmp_path, monkeypatch):
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")  # a Python-only apex build: no fused_layer_norm_cuda, amp_C
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    runs, why = kernels.apex_runs()
    assert not runs and "without its CUDA extension fused_layer_norm_cuda" in why and "--cuda_ext" in why
    assert kernels.resolve_impl("model.norm_impl", "auto") == "torch"


def test_an_offloaded_optimizer_is_never_apex():
    assert kernels.optimizer_impl("auto", "adamw", offload=True) == "torch"
    for impl, name in (("apex", "adamw"), ("auto", "lamb")):
        with pytest.raises(ConfigError, match="offload_optimizer: the optimizer then steps on the CPU"):
            kernels.optimizer_impl(impl, name, offload=True)
