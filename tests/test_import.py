"""`pretrain import` of published ViT weights (built here with timm / transformers, never downloaded), feature
parity with the source models, `checkpoint.init_from` runs from the imports, and the position-table modes."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.errors import BadInputError
from pretrain import bundles, checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.importers import build_encoder, import_weights
from tests.conftest import TINY, run_pretrain

ATOL = 1e-5


def images(chans: int, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


def imported_encoder(folder: str):
    """Our encoder rebuilt from an import folder the way checkpoint.init_from loads it."""
    fields, _ = bundles.read_bundle(folder)
    encoder = build_encoder(fields)
    bundles.load_encoders([encoder], folder)
    return encoder.eval()


def max_difference(ours, theirs, x) -> float:
    with torch.no_grad():
        return float((ours(x) - theirs(x)).abs().max())


def randomise_positions(*tensors) -> None:
    """Learned-looking tables and tokens (the models' own inits are zeros or tiny)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def timm_import(tmp_path_factory):
    """A timm vit_base_patch16_224 shrunk to TINY's shapes (1 channel, learned positions), saved with timm's
    save_for_hf (safetensors + config.json with model_args), imported through the CLI."""
    import timm
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("timm_import")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                              img_size=32, patch_size=8, in_chans=1).eval()
    randomise_positions(model.pos_embed, model.cls_token)
    save_for_hf(model, str(root / "timm"), safe_serialization=True)
    result = run_pretrain(["import", str(root / "timm"), str(root / "import")])
    return model, str(root / "import"), result.stdout


@pytest.fixture(scope="module")
def dinov2_import(tmp_path_factory):
    """A transformers Dinov2Model at TINY's shapes saved with save_pretrained, imported in-process."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("hf_import")
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                     patch_size=8, num_channels=1, layerscale_value=0.5)).eval()
    randomise_positions(model.embeddings.position_embeddings, model.embeddings.cls_token, model.embeddings.mask_token)
    model.save_pretrained(str(root / "hf"))
    record = import_weights(str(root / "hf"), str(root / "import"))
    return model, str(root / "import"), record


def test_timm_vit_base_imports_with_feature_parity(timm_import):
    model, folder, stdout = timm_import
    assert "max feature difference vs the timm vit_base_patch16_224" in stdout
    record = json.load(open(os.path.join(folder, "import.json")))
    assert record["format"] == "timm vit_base_patch16_224" and record["model"]["pos_embed"] == "learned"
    assert record["parity"]["max_abs_difference"] <= ATOL
    assert max_difference(imported_encoder(folder), model.forward_features, images(1, 32)) <= ATOL
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert state["pos_embed"].shape == (1, 16, 32) and "head.weight" not in state
    torch.testing.assert_close(state["cls_token"], (model.cls_token + model.pos_embed[:, :1]).detach())  # the fold


def test_transformers_dinov2_imports_with_feature_parity(dinov2_import):
    model, folder, record = dinov2_import
    assert record["format"] == "transformers Dinov2Model"
    assert record["model"]["layer_scale_init"] > 0 and record["model"]["pos_embed"] == "learned"
    assert record["parity"]["max_abs_difference"] <= ATOL
    reference = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    assert max_difference(imported_encoder(folder), reference, images(1, 32)) <= ATOL


def run_args(out, name, shards, folder, *extra):
    overrides = json.load(open(os.path.join(folder, "import.json")))["overrides"]
    return (["train"] + TINY + overrides + [f"output_dir={out}", f"name={name}", f"data.shards={shards}",
            "train.steps=5", "data.batch_size=4", "data.num_workers=0", "checkpoint.every=0",
            "tracking.backend=jsonl", f"checkpoint.init_from={folder}", *extra])


@pytest.mark.slow
def test_mae_run_starts_from_the_timm_import(timm_import, xray_shards, tmp_path):
    _, folder, _ = timm_import
    result = run_pretrain(run_args(str(tmp_path), "mae", xray_shards, folder))
    assert f"encoder weights from {folder} loaded into the student encoder" in result.stderr
    final = checkpoint_encoder(tmp_path / "mae", "encoder.")
    start = load_file(os.path.join(folder, "model.safetensors"))
    assert set(final) == set(start) and not torch.equal(final["pos_embed"], start["pos_embed"])  # it is trained
    assert max(float((final[k] - start[k]).abs().max()) for k in start) < 0.02  # 5 small Adam steps away


@pytest.mark.slow
def test_dinov2_run_starts_student_and_teacher_from_the_transformers_import(dinov2_import, xray_shards, tmp_path):
    _, folder, _ = dinov2_import
    result = run_pretrain(run_args(str(tmp_path), "dino", xray_shards, folder, "objective.name=dinov2"))
    assert "loaded into the teacher, student encoder(s)" in result.stderr
    start = load_file(os.path.join(folder, "model.safetensors"))
    student = checkpoint_encoder(tmp_path / "dino", "encoder.")
    path = checkpoint.find_latest(str(tmp_path / "dino" / "checkpoints"))
    teacher = {k[len("encoder."):]: v for k, v in checkpoint.load_objective_state(path)["teacher"].items()
               if k.startswith("encoder.")}
    for weights in (student, teacher):
        assert max(float((weights[k] - start[k]).abs().max()) for k in start) < 0.02


def checkpoint_encoder(run_dir, prefix: str) -> dict:
    from pretrain.restore import consolidated_state_dict

    state = consolidated_state_dict(checkpoint.find_latest(str(run_dir / "checkpoints")))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def mae_sincos(dim: int, grid: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed(dim, grid, cls_token=True), verbatim logic."""
    def one_d(width, pos):
        omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(rows, rows), axis=0).reshape([2, 1, grid, grid])  # meshgrid(w, h): columns first
    table = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), table], axis=0)


def test_mae_checkpoint_imports_its_column_first_table_as_sincos_mae(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                              num_classes=0, global_pool="token").eval()
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(mae_sincos(64, 4)).float()[None])
    state = dict(model.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 64),
                  "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_pred.weight": torch.randn(192, 16)})
    torch.save({"model": state}, tmp_path / "mae_pretrain.pth")
    record = import_weights(str(tmp_path / "mae_pretrain.pth"), str(tmp_path / "import"), num_heads=4)
    assert record["format"] == "mae" and record["model"]["pos_embed"] == "sincos_mae"
    assert record["parity"]["max_abs_difference"] <= ATOL
    encoder = imported_encoder(str(tmp_path / "import"))
    assert "pos_embed" not in dict(encoder.named_parameters())  # a fixed buffer, as in MAE
    assert max_difference(encoder, model.forward_features, images(3, 32)) <= ATOL


def to_dinov2_names(hf_state: dict, chunks: int) -> dict:
    """A transformers Dinov2WithRegisters state dict under facebookresearch/dinov2's names, blocks chunked."""
    out = {"cls_token": hf_state["embeddings.cls_token"], "pos_embed": hf_state["embeddings.position_embeddings"],
           "register_tokens": hf_state["embeddings.register_tokens"],
           "mask_token": hf_state["embeddings.mask_token"],  # [1, D]
           "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf_state["layernorm.weight"], "norm.bias": hf_state["layernorm.bias"]}
    depth = 1 + max(int(k.split(".")[2]) for k in hf_state if k.startswith("encoder.layer."))
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i // (depth // chunks)}.{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}attn.qkv.{kind}"] = torch.cat([hf_state[f"{hf}attention.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{ours}mlp.w12.{kind}"] = torch.cat([hf_state[f"{hf}mlp.{p}_proj.{kind}"] for p in ("gate", "up")])
            for mine, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
                                 ("mlp.w3", "mlp.down_proj")):
                out[f"{ours}{mine}.{kind}"] = hf_state[f"{hf}{theirs}.{kind}"]
        out[f"{ours}ls1.gamma"] = hf_state[f"{hf}layer_scale1.lambda1"]
        out[f"{ours}ls2.gamma"] = hf_state[f"{hf}layer_scale2.lambda1"]
    return out


def test_dinov2_backbone_pth_with_registers_swiglu_and_chunked_blocks_imports_with_parity(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_channels=3,
        use_swiglu_ffn=True, num_register_tokens=2, layerscale_value=0.3)).eval()
    randomise_positions(model.embeddings.position_embeddings, model.embeddings.cls_token,
                        model.embeddings.register_tokens)
    torch.save(to_dinov2_names(model.state_dict(), chunks=2), tmp_path / "dinov2_vits8_reg.pth")
    reference = lambda x: model(pixel_values=x).last_hidden_state  # noqa: E731
    # the weights do not record the head count: by default 64-wide heads (1 here), which the timm reference
    # built from the same weights shares, so only the true model shows the difference
    record = import_weights(str(tmp_path / "dinov2_vits8_reg.pth"), str(tmp_path / "default_heads"))
    fields = record["model"]
    assert (fields["ffn"], fields["num_registers"], fields["num_heads"]) == ("swiglu", 2, 1)
    assert max_difference(imported_encoder(str(tmp_path / "default_heads")), reference, images(3, 32)) > 10 * ATOL
    record = import_weights(str(tmp_path / "dinov2_vits8_reg.pth"), str(tmp_path / "import"), num_heads=4)
    assert record["format"] == "dinov2" and record["parity"]["max_abs_difference"] <= ATOL
    assert "timm's DINOv2 converter" in record["parity"]["reference"]
    assert max_difference(imported_encoder(str(tmp_path / "import")), reference, images(3, 32)) <= ATOL


def test_transformers_vit_imports_and_a_layer_norm_eps_other_than_ours_fails_the_check(tmp_path):
    from transformers import ViTConfig, ViTModel

    for eps in (1e-6, 1e-12):  # 1e-12: transformers' ViT default, Google's checkpoints
        torch.manual_seed(0)
        ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                           intermediate_size=256, layer_norm_eps=eps)).save_pretrained(str(tmp_path / f"vit{eps}"))
    record = import_weights(str(tmp_path / "vit1e-06"), str(tmp_path / "import"))
    assert record["format"] == "transformers ViTModel" and record["parity"]["max_abs_difference"] <= ATOL
    with pytest.raises(BadInputError, match=r"differ .* by .*layer_norm_eps 1e-12 in the source, 1e-6 in ours"):
        import_weights(str(tmp_path / "vit1e-12"), str(tmp_path / "import_eps"))
    assert import_weights(str(tmp_path / "vit1e-12"), str(tmp_path / "import_eps"), atol=1e-2)["parity"]


def test_an_export_bundle_imports_as_a_timm_folder_with_its_own_settings(tmp_path):
    """Registers, LayerScale and SwiGLU through timm's SwiGLUPacked; our fixed table is recognised."""
    from safetensors.torch import save_file

    from pretrain.export import timm_config, timm_state_dict
    from pretrain.backbone import build_vit

    cfg = load_config(None, TINY + ["model.ffn=swiglu", "model.num_registers=2", "model.layer_scale_init=0.1"])
    encoder = build_vit(cfg.model).eval()
    save_file(timm_state_dict(encoder), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(timm_config(cfg.model, encoder)))
    record = import_weights(str(tmp_path / "model.safetensors"), str(tmp_path / "import"))
    assert record["format"] == "timm vit_giant_patch14_dinov2" and record["parity"]["max_abs_difference"] <= ATOL
    expected = {k: v for k, v in bundles.encoder_fields(encoder).items() if k != "size"}
    assert {k: v for k, v in record["model"].items() if k != "size"} == expected  # pos_embed: sincos


def test_head_counts_of_pth_sources_default_to_published_widths_or_64_wide_heads():
    from pretrain.import_sources import default_heads

    assert [default_heads(d, "x.pth", None) for d in (384, 768, 1024, 1280, 1536)] == [6, 12, 16, 16, 24]
    with pytest.raises(BadInputError, match="x.pth: width 100 .*--num-heads"):
        default_heads(100, "x.pth", None)


def test_unknown_sources_are_clear_errors(tmp_path, capsys):
    (tmp_path / "weights.txt").write_text("not weights")
    with pytest.raises(BadInputError, match="weights.txt: unknown format"):
        import_weights(str(tmp_path / "weights.txt"), str(tmp_path / "out"))
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(BadInputError, match="resnet.pth: not a ViT"):
        import_weights(str(tmp_path / "resnet.pth"), str(tmp_path / "out"))
    from pretrain.main import main

    assert main(["import", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "pretrain import: error:" in capsys.readouterr().err


def objective_for(*overrides):
    from pretrain.objectives import build_objective

    return build_objective(load_config(None, TINY + ["model.in_chans=1", *overrides]))


def test_init_from_with_other_shapes_or_positions_names_the_fields_and_the_overrides(dinov2_import, tmp_path):
    _, folder, _ = dinov2_import
    with pytest.raises(ConfigError, match=r"embed_dim 64 \(import: 32\).*depth 3 \(import: 2\).*model\.embed_dim=32"):
        bundles.init_encoders(objective_for("model.embed_dim=64", "model.depth=3", "model.layer_scale_init=0.1",
                                               "model.pos_embed=learned"), folder)
    with pytest.raises(ConfigError, match=r"pos_embed sincos \(import: learned\)"):
        bundles.init_encoders(objective_for("model.layer_scale_init=0.1"), folder)
    with pytest.raises(BadInputError, match="not an import folder or export bundle"):
        bundles.init_encoders(objective_for(), str(tmp_path))


def test_init_from_resamples_a_learned_table_to_the_runs_grid_and_resuming_ignores_it(dinov2_import, caplog):
    from pretrain.models.pos_embed import resample_2d
    from pretrain.trainer import Trainer

    _, folder, _ = dinov2_import
    objective = objective_for("model.img_size=64", "model.layer_scale_init=0.1", "model.pos_embed=learned",
                              "objective.name=dinov2")
    message = bundles.init_encoders(objective, folder)
    assert "resampled from 4x4 to 8x8" in message
    table = load_file(os.path.join(folder, "model.safetensors"))["pos_embed"][0]
    for encoder in objective.encoders().values():
        torch.testing.assert_close(encoder.pos_embed.detach()[0], resample_2d(table, (4, 4), (8, 8)))
    trainer = SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(init_from=folder)))
    with caplog.at_level("INFO"):
        assert Trainer._init_encoders(trainer, "runs/x/checkpoints/step_000010") == ""
    assert "ignored: resuming from runs/x/checkpoints/step_000010" in caplog.text


@pytest.mark.parametrize("mode", ["sincos_mae", "learned"])
def test_position_modes_train_and_export_with_timm_and_transformers_parity(mode, tmp_path):
    from pretrain.export import timm_config, timm_state_dict
    from pretrain.export_hf import verify, write_hf
    from pretrain.models.pos_embed import sincos_2d, sincos_2d_mae
    from pretrain.backbone import build_vit
    from pretrain.optim import param_groups

    cfg = load_config(None, TINY + [f"model.pos_embed={mode}", "model.in_chans=1"])
    encoder = build_vit(cfg.model)
    torch.testing.assert_close(encoder.pos_embed[0], (sincos_2d if mode == "learned" else sincos_2d_mae)(32, 4, 4))
    learned = dict(encoder.named_parameters()).get("pos_embed")
    assert (learned is not None) == (mode == "learned")
    if learned is not None:  # trained, at other sizes too (resampled differentiably), and never decayed
        encoder(torch.randn(2, 1, 48, 48)).sum().backward()
        assert learned.grad.abs().sum() > 0
        wrapper = torch.nn.Module()
        wrapper.encoder = encoder
        group = next(g for g in param_groups(wrapper, 0.05, 1.0, 2) if "encoder.pos_embed" in g["names"])
        assert group["weight_decay"] == 0.0
        with torch.no_grad():
            learned.add_(torch.randn_like(learned))
    encoder.eval()
    from safetensors.torch import save_file

    save_file(timm_state_dict(encoder), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**timm_config(cfg.model, encoder),
                                                      "pretrain_model": bundles.encoder_fields(encoder)}))
    write_hf(encoder, str(tmp_path))
    report = verify(str(tmp_path), encoder)
    assert report["timm"] < 1e-5 and report["transformers"] < 1e-4
    assert max_difference(imported_encoder(str(tmp_path)), encoder, images(1, 32)) == 0.0  # init_from reads bundles
    (tmp_path / "config.json").write_text(json.dumps(timm_config(cfg.model, encoder)))  # a bundle of before
    expected = {k: v for k, v in bundles.encoder_fields(encoder).items() if k != "size"}
    assert bundles.read_bundle(str(tmp_path))[0] == expected  # pos_embed told from the table itself


def test_3d_models_keep_the_fixed_table_only():
    with pytest.raises(ConfigError, match="model.pos_embed=learned: 3D models"):
        load_config(None, ["model.frames=4", "model.pos_embed=learned"])


def test_dinov2s_trained_mask_token_starts_the_students_and_the_teachers(dinov2_import, tmp_path):
    """DINOv2's iBOT mask token is trained: it travels in extras.safetensors into both DINOv2 mask tokens; an
    MAE objective (no such parameter) loads the encoder alone."""
    model, folder, record = dinov2_import
    assert any("kept beside the encoder for the DINOv2 student: mask_token" in n for n in record["notes"])
    assert os.path.isfile(os.path.join(folder, bundles.BUNDLE_EXTRAS))
    objective = objective_for("model.layer_scale_init=0.1", "model.pos_embed=learned", "objective.name=dinov2")
    assert "mask_token from the import" in bundles.init_encoders(objective, folder)
    source = model.embeddings.mask_token.detach().reshape(-1)
    for dino in (objective.student, objective.teacher):
        torch.testing.assert_close(dino.mask_token.detach(), source)
    mae = objective_for("model.layer_scale_init=0.1", "model.pos_embed=learned")
    assert "from the import" not in bundles.init_encoders(mae, folder)


def test_a_failed_parity_check_is_refused_by_init_from_and_a_reimport_leaves_no_stale_extras(dinov2_import,
                                                                                           tmp_path):
    import shutil

    _, folder, _ = dinov2_import
    copy = str(tmp_path / "import")
    shutil.copytree(folder, copy)
    path = os.path.join(copy, "import.json")
    record = json.load(open(path))
    record["parity"].update(ok=False, max_abs_difference=0.3)
    json.dump(record, open(path, "w"))
    with pytest.raises(BadInputError, match="import.json.*larger --atol"):
        bundles.init_encoders(objective_for("model.layer_scale_init=0.1", "model.pos_embed=learned"), copy)
    import timm
    from timm.models import save_for_hf

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                            img_size=32, patch_size=8, in_chans=1)
    save_for_hf(vit, str(tmp_path / "timm"), safe_serialization=True)
    import_weights(str(tmp_path / "timm"), copy)  # into the DINOv2 import's folder
    assert not os.path.exists(os.path.join(copy, bundles.BUNDLE_EXTRAS))
    assert json.load(open(path))["parity"]["ok"] is True


def test_a_distilled_timm_vit_is_refused_naming_the_file(tmp_path):
    import timm
    from timm.models import save_for_hf

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, embed_dim=32, depth=2,
                             num_heads=2, img_size=32, patch_size=8, in_chans=1)
    save_for_hf(deit, str(tmp_path / "deit"), safe_serialization=True)
    with pytest.raises(BadInputError, match="deit.*VisionTransformerDistilled is not timm's VisionTransformer"):
        import_weights(str(tmp_path / "deit"), str(tmp_path / "out"))
