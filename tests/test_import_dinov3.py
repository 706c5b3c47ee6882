"""DINOv3 encoders: our rotary positions against DINOv3's equations, `pretrain import` of a transformers
DINOv3ViTModel folder and of a facebookresearch/dinov3 backbone .pth (built here from that model), feature
parity with the source, packed crops, and a DINOv2 run from the import."""
import json
import math
import os

import pytest
import torch

from pretrain import bundles
from pretrain.config import ConfigError, load_config
from pretrain.importers import build_encoder, import_weights
from pretrain.models.rope import Rope
from tests.conftest import TINY, run_pretrain

ATOL = 1e-5


def dinov3_model(gated: bool = False):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64 if gated else 128, image_size=32, patch_size=8, num_channels=1,
                             num_register_tokens=2, layerscale_value=0.5, use_gated_mlp=gated,
                             hidden_act="silu" if gated else "gelu")  # DINOv3's gated MLPs are SwiGLU
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        model.embeddings.mask_token.normal_()
        for layer in model.model.layer:  # trained-looking LayerScale, not its constant init
            layer.layer_scale1.lambda1.uniform_(0.2, 1.0)
    return model


def features_difference(folder: str, model) -> float:
    fields, _ = bundles.read_bundle(folder)
    ours = build_encoder(fields)
    bundles.load_encoders([ours], folder)
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((ours.eval()(images) - model(pixel_values=images).last_hidden_state).abs().max())


@pytest.fixture(scope="module")
def dinov3_import(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov3")
    model = dinov3_model()
    model.save_pretrained(str(root / "hf"))
    return model, str(root / "import"), import_weights(str(root / "hf"), str(root / "import"))


def test_rotary_tables_follow_dinov3s_equations():
    """Mirrors dinov3/layers/rope_position_encoding.py RopePositionEmbedding (normalize_coords='separate'):
    patch centres in [-1, 1] per axis, periods base^(4k / D), angles 2 pi coord / period as [y..., x...] twice."""
    rope, grid, head = Rope(head_dim=8, base=100.0), (2, 3), 8
    cos, sin = rope.tables(grid, prefix=1, device=torch.device("cpu"), dtype=torch.float64, training=False)
    assert torch.equal(cos[0], torch.ones(head)) and torch.equal(sin[0], torch.zeros(head))  # the class token
    periods = [100.0 ** (4 * k / head) for k in range(head // 4)]
    for index in range(6):
        row, col = divmod(index, 3)
        y, x = 2 * (row + 0.5) / 2 - 1, 2 * (col + 0.5) / 3 - 1
        angles = [2 * math.pi * y / p for p in periods] + [2 * math.pi * x / p for p in periods]
        expected = torch.tensor(angles * 2, dtype=torch.float64)
        torch.testing.assert_close(cos[1 + index], expected.cos(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin[1 + index], expected.sin(), rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    scaled = Rope(head_dim=8, rescale=2.0).coords((2, 4), torch.device("cpu"), training=True)
    plain = rope.coords((2, 4), torch.device("cpu"), training=False)  # no coordinate at 0
    ratio = scaled / plain
    assert torch.allclose(ratio, ratio[0, 0]) and 0.5 <= float(ratio[0, 0]) <= 2.0  # one log-uniform factor


def test_transformers_dinov3_imports_with_feature_parity(dinov3_import):
    model, folder, record = dinov3_import
    assert record["format"] == "transformers DINOv3ViTModel" and record["parity"]["max_abs_difference"] <= ATOL
    assert {"model.pos_embed=rope", "model.norm_eps=1e-05", "model.rope_rescale=2.0",
            "model.key_bias=False"} <= set(record["overrides"])
    assert features_difference(folder, model) <= ATOL
    assert os.path.isfile(os.path.join(folder, bundles.BUNDLE_EXTRAS))  # the trained mask token


def test_gated_dinov3_imports_as_swiglu(tmp_path):
    model = dinov3_model(gated=True)
    model.save_pretrained(str(tmp_path / "hf"))
    record = import_weights(str(tmp_path / "hf"), str(tmp_path / "import"))
    assert record["model"]["ffn"] == "swiglu" and record["parity"]["max_abs_difference"] <= ATOL


def dinov3_backbone_state(model) -> dict:
    """The facebookresearch/dinov3 DinoVisionTransformer names of a transformers DINOv3ViTModel's weights
    (storage tokens, packed qkv with its bias mask, rope periods)."""
    sd, dim, head = model.state_dict(), 32, 16
    state = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
             "mask_token": sd["embeddings.mask_token"].reshape(1, dim),
             "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
             "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
             "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
             "rope_embed.periods": (100.0 ** (4 * torch.arange(head // 4) / head)).bfloat16()}  # DINOv3's bf16 rope
    for index in range(2):
        hf, ours = f"model.layer.{index}.", f"blocks.{index}."
        attn = hf + "attention."
        state[ours + "attn.qkv.weight"] = torch.cat([sd[attn + f"{p}_proj.weight"] for p in "qkv"])
        key_bias = torch.randn(dim)  # masked out by bias_mask: the model never uses it
        state[ours + "attn.qkv.bias"] = torch.cat([sd[attn + "q_proj.bias"], key_bias, sd[attn + "v_proj.bias"]])
        state[ours + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        state[ours + "attn.proj.weight"], state[ours + "attn.proj.bias"] = sd[attn + "o_proj.weight"], sd[attn + "o_proj.bias"]
        for name in ("norm1", "norm2"):
            state[ours + name + ".weight"], state[ours + name + ".bias"] = sd[hf + name + ".weight"], sd[hf + name + ".bias"]
        state[ours + "ls1.gamma"], state[ours + "ls2.gamma"] = sd[hf + "layer_scale1.lambda1"], sd[hf + "layer_scale2.lambda1"]
        state[ours + "mlp.fc1.weight"], state[ours + "mlp.fc1.bias"] = sd[hf + "mlp.up_proj.weight"], sd[hf + "mlp.up_proj.bias"]
        state[ours + "mlp.fc2.weight"], state[ours + "mlp.fc2.bias"] = sd[hf + "mlp.down_proj.weight"], sd[hf + "mlp.down_proj.bias"]
    return state


def test_dinov3_backbone_pth_imports_with_feature_parity(tmp_path):
    model = dinov3_model()
    torch.save(dinov3_backbone_state(model), tmp_path / "dinov3_vits_tiny.pth")
    record = import_weights(str(tmp_path / "dinov3_vits_tiny.pth"), str(tmp_path / "import"))
    assert record["model"]["num_heads"] == 2  # from the rope periods: head width 4 x 4
    assert record["format"] == "dinov3" and record["model"]["rope_base"] == pytest.approx(100.0)
    assert record["model"]["key_bias"] is False  # its qkv.bias_mask
    assert record["parity"] is None  # no reference model for a bare backbone: compared here instead
    # the backbone's 32-px grid is unknown to the file (the hub models' 224 px is assumed): compare at 32 px
    fields, _ = bundles.read_bundle(str(tmp_path / "import"))
    ours = build_encoder({**fields, "img_size": 32})
    bundles.load_encoders([ours], str(tmp_path / "import"))
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert float((ours.eval()(images) - model(pixel_values=images).last_hidden_state).abs().max()) <= ATOL


def test_packed_crops_rotate_each_sequence_by_its_own_grid():
    cfg = load_config(None, TINY + ["model.in_chans=1", "model.pos_embed=rope", "objective.name=dinov2"])
    from pretrain.backbone import build_vit

    encoder = build_vit(cfg.model).eval()
    groups = [encoder.embed_patches(torch.randn(2, 1, 32, 32)), encoder.embed_patches(torch.randn(3, 1, 16, 16))]
    with torch.no_grad():
        packed = encoder.forward_tokens_many(groups, pack="always")
        alone = [encoder.forward_tokens(tokens) for tokens in groups]
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rotary_positions_are_refused_for_objectives_that_encode_a_subset():
    with pytest.raises(ConfigError, match="pos_embed=rope works with objective.name=dinov2"):
        load_config(None, ["model.pos_embed=rope", "objective.name=mae"])


@pytest.mark.slow
def test_dinov2_run_starts_from_the_dinov3_import(dinov3_import, xray_shards, tmp_path):
    _, folder, _ = dinov3_import
    overrides = json.load(open(os.path.join(folder, "import.json")))["overrides"]
    result = run_pretrain(["train"] + TINY + overrides + [
        "objective.name=dinov2", "objective.dinov2.pack_crops=always", f"output_dir={tmp_path}", "name=dino",
        f"data.shards={xray_shards}", "train.steps=5", "data.batch_size=4", "data.num_workers=0",
        "checkpoint.every=0", "tracking.backend=jsonl", f"checkpoint.init_from={folder}"])
    assert "loaded into the teacher, student encoder(s); mask_token from the import" in result.stderr
    rows = [json.loads(line) for line in open(tmp_path / "dino" / "metrics.jsonl")]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)


def test_a_masked_key_bias_stays_zero_in_training():
    """DINOv3's LinearKMaskedBias: the key third of the qkv bias takes no part and gets no gradient."""
    from pretrain.models.blocks import Attention

    attn = Attention(8, 2, "sdpa", key_bias=False)
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(1, 4, 8)
    attn(x).sum().backward()
    assert attn.qkv.bias.grad[8:16].abs().max() == 0 and attn.qkv.bias.grad[:8].abs().max() > 0
    with torch.no_grad():
        attn.qkv.bias[8:16] = 5.0
    before = attn(x)
    with torch.no_grad():
        attn.qkv.bias[8:16] = -5.0
    torch.testing.assert_close(attn(x), before)
    for param in attn.parameters():  # as DeepSpeed's bf16 engine converts a module: parameters, not the mask
        param.data = param.data.to(torch.bfloat16)
    assert attn(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_rotary_positions_follow_a_non_square_grid_and_are_drawn_per_block_in_training():
    from pretrain.backbone import build_vit

    cfg = load_config(None, TINY + ["model.in_chans=1", "model.pos_embed=rope", "objective.name=dinov2",
                                    "model.rope_rescale=2.0"])
    encoder = build_vit(cfg.model).eval()
    images = torch.randn(2, 1, 16, 64)  # a 2 x 8 patch grid
    tokens = encoder.embed_patches(images)
    with torch.no_grad():
        features = encoder(images)
        torch.testing.assert_close(features, encoder.forward_tokens(tokens, (2, 8)))
        assert (features - encoder.forward_tokens(tokens)).abs().max() > 1e-3  # a 4 x 4 reading differs
    draws = []
    for block in encoder.blocks:
        block.attn.register_forward_pre_hook(lambda module, args: draws.append(args[2][0].clone()))
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(2, 1, 32, 32))
    assert len(draws) == 2 and not torch.equal(draws[0], draws[1])  # DINOv3 draws the rescale per block
