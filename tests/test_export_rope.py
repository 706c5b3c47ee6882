"""Export of encoders with DINOv3's rotary positions (model.pos_embed=rope): the timm Eva and transformers
DINOv3ViTModel copies against our features (fp32, 1e-5), the key bias they keep, the name mapping against the
importer's, and a bundle assembled as `pretrain export` does it checked by verify()."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain import bundles, export_rope
from pretrain.config import load_config
from pretrain.export import timm_config, timm_state_dict
from pretrain.export_hf import HF_FOLDER, verify, write_hf
from pretrain.backbone import build_vit

ATOL = 1e-5


def rope_encoder(ffn="mlp", registers=2, layer_scale=0.5, eps=1e-5, base=100.0, rescale=2.0, chans=3,
                 key_bias=True):
    """A tiny rope encoder (width 32, 2 blocks, 2 heads, 32 px, patch 8) with trained-looking weights: every
    parameter perturbed, so biases (the key bias too, unless ``key_bias`` is False), LayerScale and norms
    are not their constant initialisations."""
    cfg = load_config(None, [
        "model.size=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32",
        "model.patch_size=8", f"model.in_chans={chans}", f"model.num_registers={registers}",
        f"model.layer_scale_init={layer_scale}", f"model.ffn={ffn}", "model.pos_embed=rope",
        f"model.norm_eps={eps}", f"model.rope_base={base}", f"model.rope_rescale={rescale}",
        "model.attn_backend=sdpa", "model.norm_impl=torch", "objective.name=dinov2",
        f"data.transforms.mean={[0.5] * chans}", f"data.transforms.std={[0.25] * chans}"])
    torch.manual_seed(0)
    encoder = build_vit(cfg.model)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        if not key_bias:
            for bias in export_rope.key_biases(encoder):
                bias.zero_()
    return cfg, encoder.eval()


def images(chans=3, size=32, batch=2):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


def timm_copy(cfg, encoder):
    import timm

    config = timm_config(cfg.model, encoder)
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(timm_state_dict(encoder), strict=True)
    return model


def hf_copy(encoder, folder):
    from transformers import AutoModel

    write_hf(encoder, str(folder))
    return AutoModel.from_pretrained(os.path.join(str(folder), HF_FOLDER), local_files_only=True).eval()


def differences(encoder, timm_model, hf_model, x) -> dict:
    with torch.no_grad():
        ours = encoder(x)
        return {"timm": float((timm_model.forward_features(x) - ours).abs().max()),
                "transformers": float((hf_model(pixel_values=x).last_hidden_state - ours).abs().max())}


@pytest.mark.parametrize("ffn,registers,layer_scale,eps,chans", [
    ("mlp", 2, 0.5, 1e-5, 3),      # DINOv3 ViT-S/B/L-like
    ("swiglu", 2, 0.5, 1e-5, 1),   # DINOv3 ViT-S+/H+/7B-like (gated), one channel
    ("mlp", 0, 0.0, 1e-6, 3),      # no registers, no LayerScale, timm's default eps
])
def test_timm_eva_and_transformers_dinov3_give_our_features(ffn, registers, layer_scale, eps, chans, tmp_path):
    cfg, encoder = rope_encoder(ffn, registers, layer_scale, eps, chans=chans)
    timm_model, hf_model = timm_copy(cfg, encoder), hf_copy(encoder, tmp_path)
    assert type(timm_model).__name__ == "Eva" and type(hf_model).__name__ == "DINOv3ViTModel"
    assert timm_model.pos_embed is None and timm_model.blocks[0].norm1.eps == eps
    assert hf_model.config.layer_norm_eps == eps and hf_model.config.use_gated_mlp == (ffn == "swiglu")
    for size in (32, 48):  # the configured grid and another square one (both rebuild the table per input)
        report = differences(encoder, timm_model, hf_model, images(chans, size))
        assert max(report.values()) <= ATOL, (size, report)


def test_a_trained_key_bias_changes_rotary_attention_and_is_kept(tmp_path):
    """Without rotary positions a key bias adds q . b_k to every score of a query alike; rotated with each patch
    it does not, so the exports keep it (transformers key_bias=True; timm's packed qkv bias)."""
    cfg, encoder = rope_encoder()
    x = images()
    with torch.no_grad():
        reference = encoder(x)
        biases = export_rope.key_biases(encoder)
        kept = [bias.clone() for bias in biases]
        for bias in biases:
            bias.zero_()
        dropped = encoder(x)
        for bias, value in zip(biases, kept):
            bias.copy_(value)
    assert float((dropped - reference).abs().max()) > 1e-3
    hf_model = hf_copy(encoder, tmp_path)
    assert hf_model.config.key_bias and export_rope.has_key_bias(encoder)
    timm_qkv_bias = timm_copy(cfg, encoder).blocks[0].attn.qkv.bias
    torch.testing.assert_close(timm_qkv_bias[32:64], kept[0], rtol=0, atol=0)


def test_a_zero_key_bias_exports_as_dinov3s_layout(tmp_path):
    cfg, encoder = rope_encoder(key_bias=False)
    hf_model = hf_copy(encoder, tmp_path)
    assert not hf_model.config.key_bias and hf_model.model.layer[0].attention.k_proj.bias is None
    assert max(differences(encoder, timm_copy(cfg, encoder), hf_model, images()).values()) <= ATOL


def dinov3_model(gated: bool):
    """A transformers DINOv3ViTModel as published (no key bias), random and trained-looking."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64 if gated else 128, image_size=32, patch_size=8, num_channels=3,
                             num_register_tokens=2, layerscale_value=0.5, layer_norm_eps=1e-5, use_gated_mlp=gated,
                             hidden_act="silu" if gated else "gelu")
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("gated", [False, True])
def test_the_export_mapping_inverts_the_importers(gated):
    """transformers DINOv3 -> ours (the importer's hf_to_timm) -> transformers (the export's) is the identity."""
    from pretrain.import_sources import hf_to_timm
    from pretrain.importers import build_encoder

    model = dinov3_model(gated)
    source = model.state_dict()
    ours = {name: value for name, value in hf_to_timm(source).items() if name != "mask_token"}
    fields = {"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "mlp_ratio": 3.0 if gated else 4.0, "num_registers": 2, "layer_scale_init": 0.5,
              "ffn": "swiglu" if gated else "mlp", "pos_embed": "rope", "norm_eps": 1e-5, "rope_base": 100.0,
              "rope_rescale": 2.0}
    encoder = build_encoder(fields).eval()
    encoder.load_state_dict(ours, strict=True)
    back = export_rope.hf_state_dict(encoder, export_rope.hf_model(encoder))
    assert not export_rope.has_key_bias(encoder)  # the importer's zeros
    assert set(back) == set(source)
    for name, value in source.items():
        if name != "embeddings.mask_token":  # the importer keeps it in extras; features never use it
            assert torch.equal(back[name], value), name
    # and the timm names are ours with LayerScale renamed, which read_bundle undoes
    eva = export_rope.timm_state_dict(encoder)
    assert "blocks.0.gamma_1" in eva and "blocks.1.gamma_2" in eva and "pos_embed" not in eva
    assert export_rope.ours_from_timm(eva).keys() == encoder.state_dict().keys()
    with torch.no_grad():
        assert float((encoder(images()) - model(pixel_values=images()).last_hidden_state).abs().max()) <= ATOL


def test_an_assembled_bundle_verifies_and_loads_back(tmp_path):
    """model.safetensors, config.json and hf/ written by the functions `pretrain export` calls, then verify()
    (timm from config.json, transformers from hf/) and init_from's reader."""
    cfg, encoder = rope_encoder("swiglu", rescale=2.0)
    bundle = str(tmp_path / "bundle")
    os.makedirs(bundle)
    save_file(timm_state_dict(encoder), os.path.join(bundle, "model.safetensors"), metadata={"format": "pt"})
    config = timm_config(cfg.model, encoder)
    config["pretrain_model"] = bundles.encoder_fields(encoder, cfg.model.size)
    with open(os.path.join(bundle, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    write_hf(encoder, bundle)
    report = verify(bundle, encoder, atol=ATOL)
    assert set(report) == {"timm", "transformers"} and max(report.values()) <= ATOL, report
    saved = json.load(open(os.path.join(bundle, "config.json")))
    assert saved["architecture"] == "vit_base_patch16_dinov3"  # size tiny: the B preset (model_args set the widths)
    assert saved["model_args"]["rope_type"] == "dinov3" and saved["model_args"]["rope_rescale_coords"] == 2.0
    assert None not in saved["model_args"].values()
    hf_config = json.load(open(os.path.join(bundle, HF_FOLDER, "config.json")))
    assert hf_config["model_type"] == "dinov3_vit" and hf_config["pos_embed_rescale"] == 2.0
    assert "blocks.0.gamma_1" in load_file(os.path.join(bundle, "model.safetensors"))
    fields, state = bundles.read_bundle(bundle)
    assert fields["pos_embed"] == "rope" and "blocks.0.ls1.gamma" in state
    _, fresh = rope_encoder("swiglu", rescale=2.0)  # the same draw: so that loading must restore what is changed
    with torch.no_grad():
        fresh.blocks[0].attn.qkv.bias.zero_()
        fresh.blocks[1].ls2.gamma.fill_(1.0)
    bundles.load_encoders([fresh], bundle)
    with torch.no_grad():
        assert torch.equal(fresh(images()), encoder(images()))


def test_a_layer_norm_eps_no_eva_architecture_has_is_refused():
    cfg, encoder = rope_encoder(eps=1e-4)
    with pytest.raises(ValueError, match="norm_eps=0.0001"):
        timm_config(cfg.model, encoder)


@pytest.mark.parametrize("eps,layer_scale", sorted(export_rope.EVA_ARCH))
def test_every_eva_architecture_of_the_table_rebuilds_the_encoder(eps, layer_scale):
    """model_args override every preset setting that shapes the forward, whichever architecture names it."""
    import timm

    cfg, encoder = rope_encoder("swiglu", layer_scale=0.5 if layer_scale else 0.0, eps=eps)
    config = timm_config(cfg.model, encoder)
    assert config["architecture"] in export_rope.EVA_ARCH[(eps, layer_scale)].values()
    for arch in export_rope.EVA_ARCH[(eps, layer_scale)].values():
        model = timm.create_model(arch, pretrained=False, **config["model_args"]).eval()
        model.load_state_dict(timm_state_dict(encoder), strict=True)
        with torch.no_grad():
            assert float((model.forward_features(images()) - encoder(images())).abs().max()) <= ATOL, arch
