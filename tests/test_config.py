"""Config loading: defaults, YAML, overrides, and clear errors for bad keys and values."""
import glob
import os

import pytest

from pretrain.config import ConfigError, RunConfig, flatten, load_config, to_yaml
from tests.conftest import REPO

SHIPPED = sorted(glob.glob(os.path.join(REPO, "pretrain", "configs", "*.yaml")))


def test_defaults_are_the_tiny_mae_run():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.objective.name == "mae" and cfg.model.in_chans == 1 and cfg.model.size == "tiny"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  img_size: 64\n  patch_size: 8\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=9", "distributed.zero_stage=3"])
    assert (cfg.model.img_size, cfg.train.steps, cfg.distributed.zero_stage) == (64, 9, 3)


@pytest.mark.parametrize("shipped", SHIPPED, ids=os.path.basename)
def test_every_shipped_recipe_loads(shipped, tmp_path):
    cfg = load_config(shipped)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(cfg))
    assert load_config(str(resolved)) == cfg
    assert flatten(cfg)["objective.name"] == cfg.objective.name


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dpeth: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.dpeth"):
        load_config(str(path))


def test_unknown_key_on_command_line_names_key():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(None, ["optim.learning_rate=0.1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])


def test_bad_choice_and_inconsistent_values():
    with pytest.raises(ConfigError, match=r"distributed\.zero_stage"):
        load_config(None, ["distributed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"model\.patch_size"):
        load_config(None, ["model.img_size=30", "model.patch_size=8"])
    with pytest.raises(ConfigError, match=r"mean/std"):
        load_config(None, ["model.in_chans=3"])


def test_a_password_in_the_tracking_uri_is_refused():
    with pytest.raises(ConfigError, match="tracking.uri holds a password") as refused:
        load_config(None, ["tracking.uri=https://alice:s3cret-pass@mlflow.example:5000"])
    assert "s3cret-pass" not in str(refused.value)
    assert load_config(None, ["tracking.uri=https://mlflow.example:5000"]).tracking.uri.endswith(":5000")


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/no/such.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=3", "model.num_registers=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_saved_config_rerun_reads_overridden_shards(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_config(None, ["data.shards=/data/old"])))
    assert "sources: []" in saved.read_text()  # the lone source the short form made is written in that form
    assert load_config(str(saved), ["data.shards=/data/new"]).data.sources[0].shards == "/data/new"
    mixture = ["data.sources=[{name: a, shards: /data/a}]"]
    with pytest.raises(ConfigError, match=r"data.shards=/data/new would be ignored"):
        load_config(None, mixture + ["data.shards=/data/new"])
    assert load_config(None, mixture).data.sources[0].shards == "/data/a"


def test_local_profile_loads_and_rejects_unknown_keys(tmp_path):
    from launch.local import torchrun_command
    from launch.profiles import load_profile

    profile = load_profile(os.path.join(REPO, "clusters", "local.yaml"))
    assert profile.processes_per_node == 2 and profile.env["OMP_NUM_THREADS"] == "1"
    assert "--nproc_per_node=2" in torchrun_command(profile.processes_per_node, ["train"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("processes_per_nod: 2\n")
    with pytest.raises(ConfigError, match="processes_per_nod"):
        load_profile(str(bad))


@pytest.mark.parametrize("overrides, message", [
    (["distributed.offload_param=cpu", "distributed.zero_stage=2"], "offload_param=cpu needs distributed.zero_stage=3"),
    (["distributed.offload_optimizer=cpu"], "offload_optimizer=cpu needs ZeRO 1-3"),
    (["distributed.offload_optimizer=nvme", "distributed.zero_stage=2"], "offload_optimizer=nvme needs"),
    (["distributed.offload_param=nvme", "distributed.zero_stage=3"], "distributed.nvme_path"),
    (["distributed.offload_param=gpu", "distributed.zero_stage=3"], "is not one of"),
])
def test_offload_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_offload_reaches_the_deepspeed_config():
    from pretrain.engine import deepspeed_config

    cfg = load_config(None, ["distributed.zero_stage=3", "distributed.offload_param=nvme",
                             "distributed.offload_optimizer=cpu", "distributed.nvme_path=/local/nvme"])
    zero = deepspeed_config(cfg, 8)["zero_optimization"]
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": "/local/nvme", "pin_memory": False}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert deepspeed_config(cfg, 8)["aio"]["block_size"] == 1 << 20
