"""Export on meta parameters: the objective and the transformers model are built without weights of their own
and take the checkpoint's tensors (``assign=True``), and the bundle is bit-identical to one written from a
randomly initialised build (the path before), for MAE under ZeRO-3 (and with the Dinov2 layout), DINOv2 with
rotary positions and a masked key bias (teacher, fixed buffers) and VideoMAE (3D sin-cos table)."""
import contextlib
import filecmp
import os

import pytest
import torch

from pretrain import checkpoint, export_hf
from pretrain.config import load_config
from pretrain.export import export, trained_objective
from pretrain.restore import consolidated_state_dict
from pretrain.kernels import portable
from pretrain.objectives import build_objective
from tests.conftest import REPO, TINY, run_pretrain

pytestmark = pytest.mark.slow


def recipe(name: str) -> str:
    return os.path.join(REPO, "pretrain", "configs", f"{name}.yaml")


@pytest.fixture(scope="module")
def tiny_checkpoints(xray_shards, video_shards, tmp_path_factory) -> dict:
    """The final checkpoint of 2-step tiny runs, by name: MAE (2 processes, ZeRO-3, every parameter partitioned:
    a transformers ViTModel), MAE with a register, SwiGLU and LayerScale (a Dinov2WithRegistersModel), DINOv2
    with rotary positions and no key bias (a DINOv3ViTModel; the teacher) and VideoMAE (3D, ours only)."""
    out = str(tmp_path_factory.mktemp("meta_export"))
    common = ["train.steps=2", "checkpoint.every=0", "train.image_every=0", "data.num_workers=0",
              "tracking.enabled=false", f"output_dir={out}"]
    runs = {
        "mae": ["--nproc", "2", "--config", recipe("mae_tiny_cpu"), *TINY, f"data.shards={xray_shards}",
                "data.batch_size=4", "distributed.zero_stage=3", "distributed.zero3_persistence_threshold=0"],
        "mae_swiglu": ["--config", recipe("mae_tiny_cpu"), *TINY, f"data.shards={xray_shards}", "data.batch_size=4",
                       "model.num_registers=1", "model.ffn=swiglu", "model.layer_scale_init=1e-5",
                       "distributed.zero_stage=0"],
        "dinov2": ["--config", recipe("dinov2_tiny_cpu"), *TINY, f"data.shards={xray_shards}", "data.batch_size=4",
                   "model.pos_embed=rope", "model.key_bias=false", "distributed.zero_stage=0"],
        "videomae": ["--config", recipe("videomae_v2_tiny_video_cpu"), f"data.shards={video_shards}",
                     "data.batch_size=2", "distributed.zero_stage=0"],
    }
    for name, args in runs.items():
        run_pretrain(["train", *args, *common, f"name={name}"])
    return {name: checkpoint.find_latest(os.path.join(out, name, "checkpoints")) for name in runs}


def randomly_initialised(path: str):
    """The objective of checkpoint ``path`` as the export built it before: random initialisation on the CPU,
    then the checkpoint's weights copied in."""
    cfg = load_config(os.path.join(path, "config.yaml"))
    portable(cfg.model)
    objective = build_objective(cfg)
    objective.trainable().load_state_dict(consolidated_state_dict(path), strict=True)
    objective.load_state_dict(checkpoint.load_objective_state(path))
    return objective


def tensors(objective) -> dict:
    """Every parameter and buffer (non-persistent ones included) of every network of the objective."""
    out = {}
    for index, model in enumerate(objective.models()):
        out.update({f"{index}.{name}": value for name, value in model.named_parameters()})
        out.update({f"{index}.buffer.{name}": value for name, value in model.named_buffers()})
    return out


def spy(build, seen: list):
    """``build`` that records, per call, whether every parameter of what it built is on meta."""
    def built(*args):
        made = build(*args)
        models = made.models() if hasattr(made, "models") else [made]
        seen.append(all(p.is_meta for model in models for p in model.parameters()))
        return made
    return built


def test_export_builds_the_objective_and_the_transformers_model_on_meta(tiny_checkpoints, tmp_path, monkeypatch):
    objectives, hf_models = [], []
    monkeypatch.setattr("pretrain.restore.build_objective", spy(build_objective, objectives))
    monkeypatch.setattr(export_hf, "_hf_model", spy(export_hf._hf_model, hf_models))
    export(tiny_checkpoints["mae"], str(tmp_path / "bundle"))
    assert objectives == [True] and hf_models == [True]


def test_parameters_are_built_on_meta_and_buffers_as_in_training(tiny_checkpoints):
    register = torch.nn.Module.register_parameter
    for path in tiny_checkpoints.values():
        cfg = load_config(os.path.join(path, "config.yaml"))
        with export_hf.meta_parameters():
            built = build_objective(cfg)
        assert torch.nn.Module.register_parameter is register  # the swap ends with the context
        reference = build_objective(cfg)
        for index, model in enumerate(built.models()):
            params = list(model.parameters())
            assert params and all(p.is_meta for p in params), "a parameter got storage (and an initialisation)"
            assert all(isinstance(p, torch.nn.Parameter) for p in params)
            buffers = dict(model.named_buffers())
            for name, expected in reference.models()[index].named_buffers():
                assert not buffers[name].is_meta and torch.equal(buffers[name], expected), name


@pytest.mark.parametrize("run", ["mae", "mae_swiglu", "dinov2", "videomae"])
def test_meta_export_is_bit_identical_to_the_randomly_initialised_one(tiny_checkpoints, run, tmp_path,
                                                                      monkeypatch):
    path = tiny_checkpoints[run]
    _, loaded = trained_objective(path)
    expected = tensors(randomly_initialised(path))
    got = tensors(loaded)
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        assert value.device.type == "cpu" and torch.equal(value, expected[name]), name
    export(path, str(tmp_path / "meta"))
    monkeypatch.setattr(export_hf, "meta_parameters", contextlib.nullcontext)  # objective and HF model as before
    monkeypatch.setattr("pretrain.restore.meta_parameters", contextlib.nullcontext)
    export(path, str(tmp_path / "random"))
    files = sorted(os.path.relpath(os.path.join(folder, name), tmp_path / "meta")
                   for folder, _, names in os.walk(tmp_path / "meta") for name in names)
    assert "model.safetensors" in files and (run == "videomae" or "hf/model.safetensors" in files)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "meta", tmp_path / "random", files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files), (mismatch, errors)
