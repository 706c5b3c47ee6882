"""An objective is one module (its Objective class registered with its settings dataclass), one import line
and a recipe: a throwaway objective written into a temporary file, with its recipe beside it, loads as a run
config (its section, choices and checks from the registry), is planned, and trains 2 steps through the real
Trainer on CPU. Also: one name per objective, the former ``videomae_v2`` accepted with a warning."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from launch.profiles import load_profile
from pretrain.config import ConfigError, load_config, to_yaml
from pretrain.objectives import OBJECTIVES
from pretrain.plan import build_plan
from tests.conftest import REPO

PLUGIN = textwrap.dedent('''
    """Denoising: the encoder sees noisy images, a linear head predicts the clean patches."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from pretrain.errors import ConfigError
    from pretrain.models.patch_embed import patchify
    from pretrain.models.vit import VisionTransformer
    from pretrain.objectives.base import (Activation, DataSpec, Objective, ObjectiveOutput, Settings, TrunkPass,
                                          register)


    @dataclass
    class DenoiseConfig(Settings):
        noise_std: float = 0.1
        target: str = "pixels"

        choices = {"target": ("pixels",)}

        def validate(self, cfg) -> None:
            if self.noise_std < 0:
                raise ConfigError(f"objective.denoise.noise_std={self.noise_std} must be >= 0")


    class Denoiser(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(encoder.embed_dim, encoder.patch_size ** 2 * encoder.in_chans)

        def forward(self, noisy, clean):
            pred = self.head(self.encoder(noisy)[:, self.encoder.num_prefix_tokens:])
            return ((pred.float() - patchify(clean, self.encoder.patch_size)) ** 2).mean()


    @register("denoise", settings=DenoiseConfig)
    class DenoiseObjective(Objective):
        def __init__(self, cfg):
            self.cfg, m = cfg, cfg.model
            self.model = Denoiser(VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                                                    embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads))

        def data_spec(self):
            return DataSpec(kind="single", img_size=self.cfg.model.img_size, in_chans=self.cfg.model.in_chans)

        def trainable(self):
            return self.model

        def encoder(self):
            return self.model.encoder

        def __call__(self, model, batch, step):
            images = batch["image"]
            loss = model(images + self.cfg.objective.denoise.noise_std * torch.randn_like(images), images)
            return ObjectiveOutput(loss=loss)

        def token_passes(self):
            enc = self.model.encoder
            return [TrunkPass("encoder (noisy images)", enc, enc.num_prefix_tokens + enc.num_patches, 1, activations=[
                Activation("input image", 1, enc.in_chans * enc.img_size ** 2),
                Activation("loss: prediction, target, error", enc.num_patches, enc.patch_size ** 2 * enc.in_chans, 3,
                           fp32=True)])]
''')

RECIPE = textwrap.dedent('''
    name: denoise_tiny
    model: {size: tiny, embed_dim: 32, depth: 2, num_heads: 2, img_size: 32, patch_size: 8, in_chans: 1}
    objective:
      name: denoise
      denoise: {noise_std: 0.2}
    data:
      modality: xray
      batch_size: 4
      num_workers: 0
      split_by: sample
      transforms: {mean: [0.5], std: [0.25]}
    optim: {warmup_steps: 1}
    train: {steps: 2, image_every: 0}
    checkpoint: {every: 0}
    tracking: {backend: jsonl}
''')


def import_plugin(path: str):
    """Import the objective module at ``path`` (registering it)."""
    spec = importlib.util.spec_from_file_location("denoise_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_plugin(plugin: str, recipe: str, overrides: list) -> None:
    """In a fresh process: import the plugin, load its recipe, run the Trainer."""
    from pretrain import dist
    from pretrain.trainer import Trainer

    import_plugin(plugin)
    trainer = Trainer(load_config(recipe, overrides))
    try:
        trainer.train()
    finally:
        dist.destroy()


@pytest.fixture
def plugin(tmp_path):
    """The throwaway objective's module file and recipe in tmp_path, imported; unregistered afterwards."""
    (tmp_path / "denoise_plugin.py").write_text(PLUGIN)
    (tmp_path / "denoise_tiny.yaml").write_text(RECIPE)
    import_plugin(str(tmp_path / "denoise_plugin.py"))
    try:
        yield str(tmp_path / "denoise_plugin.py"), str(tmp_path / "denoise_tiny.yaml")
    finally:
        OBJECTIVES.pop("denoise")


def test_a_new_objective_loads_validates_plans_and_trains(plugin, xray_shards, tmp_path):
    module, recipe = plugin
    overrides = [f"data.shards={xray_shards}", f"output_dir={tmp_path}"]
    cfg = load_config(recipe, overrides)
    assert cfg.objective.name == "denoise" and cfg.objective.denoise.noise_std == 0.2
    assert cfg.objective.mae.mask_ratio == 0.75  # the others' sections are still there
    assert "denoise:\n    noise_std: 0.2" in to_yaml(cfg)
    with pytest.raises(ConfigError, match=r"objective.denoise.noise_std=-1.0 must be >= 0"):
        load_config(recipe, overrides + ["objective.denoise.noise_std=-1"])
    with pytest.raises(ConfigError, match=r"objective.denoise.target='edges' is not one of \['pixels'\]"):
        load_config(recipe, overrides + ["objective.denoise.target=edges"])
    with pytest.raises(ConfigError, match="objective.denoise.noise"):
        load_config(recipe, overrides + ["objective.denoise.noise=1"])  # an unknown key names its section

    plan = build_plan(cfg, load_profile(os.path.join(REPO, "clusters", "local.yaml")), deepspeed_estimates=False)
    assert [p["name"] for p in plan["passes"]] == ["encoder (noisy images)"]
    assert plan["passes"][0]["tokens"] == 17 and plan["passes"][0]["fp32_per_crop"] == 3 * 16 * 64
    assert plan["fits"] and plan["activations"] > 0 and plan["flops_per_micro_batch"] > 0

    code = (f"from tests.test_objective_plugin import train_plugin; "
            f"train_plugin({module!r}, {recipe!r}, {overrides + ['name=denoise']!r})")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "denoise" / "metrics.jsonl")]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and all(loss == loss for loss in losses), rows


def test_videomae_has_one_name_and_the_former_one_loads_with_a_warning():
    assert "videomae" in OBJECTIVES and "videomae_v2" not in OBJECTIVES
    overrides = ["data.modality=video", "model.frames=8", "data.transforms.mean=[0.5,0.5,0.5]",
                 "data.transforms.std=[0.25,0.25,0.25]", "model.in_chans=3"]
    with pytest.warns(FutureWarning, match="objective.name='videomae_v2' is deprecated: the objective is now named "
                                           "'videomae'"):
        cfg = load_config(None, overrides + ["objective.name=videomae_v2", "objective.videomae.mask_ratio=0.8"])
    assert cfg.objective.name == "videomae" and cfg.objective.videomae.mask_ratio == 0.8
    assert "name: videomae\n" in to_yaml(cfg)


def test_an_unregistered_objective_name_is_refused():
    with pytest.raises(ConfigError, match=r"objective.name='byol' is not one of \['dinov2', 'distill', 'mae', 'videomae'\]"):
        load_config(None, ["objective.name=byol"])
