"""Models are only models: ``pretrain.models`` imports nothing of the run (config, kernels, engine, DeepSpeed),
and a built model's forward decides nothing about kernels."""
import ast
import os
import subprocess
import sys

import pytest
import torch

from pretrain.backbone import bind_kernels, build_vit
from pretrain.config import load_config
from pretrain.models import attention as attention_module
from tests.conftest import REPO

MODELS = os.path.join(REPO, "pretrain", "models")
FORBIDDEN = ("deepspeed", "torch.distributed")


def imported_names(path: str) -> list:
    """Every module an ``import`` / ``from ... import`` statement of the file at ``path`` names (absolute)."""
    names = []
    for node in ast.walk(ast.parse(open(path).read(), filename=path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside pretrain.models by construction
                names.append("pretrain.models." + (node.module or ""))
            else:
                names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_models_package_imports_nothing_of_pretrain_outside_it_nor_deepspeed():
    offending = []
    for file in sorted(os.listdir(MODELS)):
        if not file.endswith(".py"):
            continue
        for name in imported_names(os.path.join(MODELS, file)):
            outside = name.split(".")[0] == "pretrain" and not name.startswith("pretrain.models")
            if outside or name.startswith(FORBIDDEN):
                offending.append(f"{file}: {name}")
    assert offending == []


def test_importing_the_models_loads_neither_the_config_the_kernels_the_engine_nor_deepspeed():
    code = ("import sys, pretrain.models, pretrain.models.heads; "
            "print(sorted(m for m in sys.modules if m.startswith(('pretrain.', 'deepspeed')) "
            "and not m.startswith('pretrain.models')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def tiny_swiglu(*overrides):
    cfg = load_config(None, ["model.size=tiny", "model.img_size=32", "model.patch_size=8", "model.ffn=swiglu",
                             *overrides])
    return build_vit(cfg.model)


def refuse_decisions(monkeypatch):
    """Make every kernel decision of :mod:`pretrain.models.attention` fail the test."""
    for name in ("resolve_backend", "choose_kernel", "xformers_available", "attention"):
        monkeypatch.setattr(attention_module, name, lambda *a, **k: pytest.fail("a kernel decided in a forward"))


@pytest.mark.parametrize("bound", [False, True])
def test_a_built_model_runs_the_kernel_it_holds_without_resolving_one(bound, monkeypatch):
    """Never bound: PyTorch's path (sdpa); bound: the kernel chosen then. The forward, the packed pass of
    several crop groups and a training embedding through every stem decide nothing."""
    from pretrain.objectives.base import embed_every_stem

    torch.manual_seed(0)
    model = tiny_swiglu("model.stems={ct: 3}").train()
    if bound:
        bind_kernels(model, torch.device("cpu"), torch.float32)
    kernels = {layer.kernel for block in model.blocks for layer in (block.attn, block.mlp)}
    assert kernels == {"sdpa"}
    refuse_decisions(monkeypatch)
    images, crops = torch.randn(2, 1, 32, 32), torch.randn(3, 1, 16, 16)
    assert model(images).shape == (2, 17, 64)
    for pack in ("auto", "always"):
        outputs = model.forward_tokens_many([model.embed_patches(images), model.embed_patches(crops)], pack)
        assert [out.shape[1] for out in outputs] == [17, 5]
    model.forward_tokens(embed_every_stem(model, torch.randn(2, 3, 32, 32), stem="ct")).sum().backward()
    assert not model.patch_embed.proj.weight.grad.any() and model.stems["ct"].proj.weight.grad.any()
