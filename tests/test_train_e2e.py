"""End to end through the real CLI: DeepSpeed ZeRO runs on 1 and 2 processes, exact resume after a kill,
export into timm, bad input and divergence handling, and every shipped recipe."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from data_pipeline.lineage import Lineage
from pretrain import checkpoint
from tests.conftest import (REPO, TINY, assert_same_weights, checkpoint_weights, kill_after_checkpoint,
                            make_bad_shards, metric_history, run_pretrain)
from tests.system_deps import require_op

pytestmark = pytest.mark.slow


def train_args(out, name, shards, *extra, nproc=1):
    args = ["train"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return args + TINY + [f"output_dir={out}", f"name={name}", f"data.shards={shards}", *extra]


@pytest.fixture(scope="module")
def zero_runs(xray_shards, tmp_path_factory):
    """The same 6 steps on the same global batch of 8: 1 process ZeRO-0, 2 processes ZeRO-2 (torch.compile'd
    blocks) and ZeRO-3
    (with activation checkpointing; and with parameters and optimizer states offloaded to the CPU),
    1 process ZeRO-1 with 2 accumulated micro-batches."""
    out = str(tmp_path_factory.mktemp("zero"))
    common = ["data.split_by=sample", "data.num_workers=0", "train.steps=6", "checkpoint.every=0"]
    offload = ["distributed.offload_param=cpu", "distributed.offload_optimizer=cpu",
               "distributed.zero3_persistence_threshold=0"]
    compiled = ["model.compile=true", "model.compile_backend=aot_eager"]  # traced blocks, same numbers
    background = ["checkpoint.writer=background"]  # written from a host copy, the same weights
    plans = {"z0": (1, 8, 0, 1, []), "z2": (2, 4, 2, 1, compiled), "z3": (2, 4, 3, 1, background),
             "z1_accum": (1, 4, 1, 2, []),
             "z3_offload": (2, 4, 3, 1, offload)}
    for name, (nproc, batch, stage, accum, extra) in plans.items():
        checkpointing = 1 if stage == 3 else 0  # recomputing activations must not change the trajectory
        run_pretrain(train_args(out, name, xray_shards, *common, f"data.batch_size={batch}",
                                f"distributed.zero_stage={stage}", f"distributed.grad_accum={accum}",
                                f"model.activation_checkpointing={checkpointing}", *extra, nproc=nproc))
    return {name: os.path.join(out, name) for name in plans}


def test_zero2_zero3_and_accumulation_follow_the_one_process_trajectory(zero_runs):
    """2 processes x 4 (ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload) and 1 process x 4 x 2 accumulated (ZeRO-1)
    match 1 x 8 (ZeRO-0)."""
    reference = metric_history(zero_runs["z0"])
    assert [step for step, _ in reference] == list(range(1, 7))
    for name in ("z2", "z3", "z1_accum", "z3_offload"):
        losses = metric_history(zero_runs[name])
        assert [s for s, _ in losses] == [s for s, _ in reference]
        for (_, expected), (_, got) in zip(reference, losses):
            assert got == pytest.approx(expected, rel=1e-4), name
        final = {run: without_key_bias(checkpoint_weights(checkpoint.find_latest(
            os.path.join(zero_runs[run], "checkpoints")))) for run in ("z0", name)}
        assert_same_weights(final["z0"], final[name], atol=1e-5)


def test_a_run_logs_how_long_saving_held_it(zero_runs):
    for name, background in (("z0", 0.0), ("z3", 1.0)):
        (step, seconds), = metric_history(zero_runs[name], "checkpoint_save_s")  # checkpoint.every=0: at the end
        (_, share), = metric_history(zero_runs[name], "checkpoint_save_share")
        assert step == 6 and seconds > 0 and 0 < share < 1
        assert metric_history(zero_runs[name], "checkpoint_background") == [(6, background)]
    (step, seconds), = metric_history(zero_runs["z3"], "checkpoint_write_s")  # the background write, at its step
    assert step == 6 and seconds > 0 and not metric_history(zero_runs["z0"], "checkpoint_write_s")


def test_zero3_nvme_offload_swaps_to_disk_and_follows_the_same_trajectory(zero_runs, xray_shards, tmp_path):
    """ZeRO-Infinity on CPU: parameters and optimizer states swapped to files under nvme_path by DeepSpeed's
    async_io op (built by `make test` before pytest starts; needs libaio) give the ZeRO-3 run's losses."""
    require_op("async_io")
    nvme = tmp_path / "nvme"
    run_pretrain(train_args(str(tmp_path), "z3_nvme", xray_shards, "data.split_by=sample", "data.num_workers=0",
                            "train.steps=6", "checkpoint.every=0", "data.batch_size=4", "distributed.zero_stage=3",
                            "model.activation_checkpointing=1", "distributed.offload_param=nvme",
                            "distributed.offload_optimizer=nvme", f"distributed.nvme_path={nvme}", nproc=2))
    folders = {str(p.relative_to(nvme)) for p in nvme.rglob("rank*")}  # swap files are removed at the end
    assert {"zero_stage_3/optimizer/rank0", "zero_stage_3/optimizer/rank1"} <= folders, folders
    assert {f for f in folders if f.endswith("params/rank1")}, folders
    expected = metric_history(zero_runs["z3"])
    got = metric_history(os.path.join(str(tmp_path), "z3_nvme"))
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, want), (_, have) in zip(expected, got):
        assert have == pytest.approx(want, rel=1e-5)


def without_key_bias(weights):
    """Weights with the key part of each qkv bias zeroed.

    Softmax is shift-invariant, so the key bias has an exactly zero true gradient; its
    computed gradient is rounding noise that Adam scales up to full-size steps, which
    differ with the reduction order. Everything else must match tightly.
    """
    out = dict(weights)
    for name, tensor in weights.items():
        if name.endswith("attn.qkv.bias"):
            third = tensor.shape[0] // 3
            out[name] = torch.cat([tensor[:third], torch.zeros(third), tensor[2 * third:]])
    return out


def test_run_folder_holds_config_tracking_and_reconstructions(zero_runs):
    run = zero_runs["z2"]
    assert os.path.isfile(os.path.join(run, "config.yaml"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run}/mlflow.db")
    (mlrun,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert mlrun.data.params["distributed.zero_stage"] == "2"
    assert mlrun.data.tags["world_size"] == "2" and "git_commit" in mlrun.data.tags
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "skipped_samples"):
        assert key in mlrun.data.metrics, key
    artifacts = glob.glob(os.path.join(run, "mlartifacts", "**", "*.png"), recursive=True)
    assert any("reconstruction_step_000006" in path for path in artifacts)


@pytest.mark.parametrize("run", ["z0", "z3"])  # module states / ZeRO shards consolidated (z2 takes z3's path)
def test_export_loads_strictly_into_timm_and_transformers_with_the_same_features(zero_runs, run, tmp_path):
    import timm
    from safetensors.torch import load_file
    from transformers import AutoModel

    from pretrain.config import load_config
    from pretrain.restore import consolidated_state_dict
    from pretrain.objectives import build_objective

    bundle = str(tmp_path / "bundle")
    result = run_pretrain(["export", zero_runs[run], bundle, "--verify"])
    assert "parity with the training encoder" in result.stdout and "logged to MLflow run" in result.stdout
    config = json.load(open(os.path.join(bundle, "config.json")))
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(load_file(os.path.join(bundle, "model.safetensors")), strict=True)
    hf_model = AutoModel.from_pretrained(os.path.join(bundle, "hf"), local_files_only=True).eval()

    path = checkpoint.find_latest(os.path.join(zero_runs[run], "checkpoints"))
    objective = build_objective(load_config(os.path.join(path, "config.yaml")))
    objective.trainable().load_state_dict(consolidated_state_dict(path))
    encoder = objective.encoder().eval()
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = encoder(images)
        assert torch.allclose(model.forward_features(images), reference, atol=1e-5)
        assert torch.allclose(hf_model(pixel_values=images).last_hidden_state, reference, atol=1e-5)
    preprocessing = json.load(open(os.path.join(bundle, "preprocessing.json")))
    assert preprocessing["in_chans"] == 1 and preprocessing["mean"] == [0.5]
    card = open(os.path.join(bundle, "MODEL_CARD.md")).read()
    run_id = result.stdout.split("logged to MLflow run ")[1].split()[0]
    assert f"| MLflow run | {run_id} |" in card and "| final metrics | loss " in card
    assert "48 samples in the manifests" in card and "6 steps x global batch 8" in card
    artifacts = glob.glob(os.path.join(zero_runs[run], "mlartifacts", "*", "artifacts", "exports", "step_000006",
                                       "model.safetensors"))
    assert artifacts, "export not logged to the run's MLflow store"


def test_export_verify_fails_loudly_when_the_bundle_does_not_match(zero_runs, tmp_path):
    from safetensors.torch import load_file, save_file

    from pretrain.config import load_config
    from pretrain.restore import consolidated_state_dict
    from pretrain.export_hf import verify
    from pretrain.objectives import build_objective

    bundle = str(tmp_path / "bundle")
    run_pretrain(["export", zero_runs["z0"], bundle])
    weights = load_file(os.path.join(bundle, "model.safetensors"))
    weights["norm.bias"] += 0.1
    save_file(weights, os.path.join(bundle, "model.safetensors"))
    path = checkpoint.find_latest(os.path.join(zero_runs["z0"], "checkpoints"))
    objective = build_objective(load_config(os.path.join(path, "config.yaml")))
    objective.trainable().load_state_dict(consolidated_state_dict(path))
    with pytest.raises(AssertionError, match="timm features differ"):
        verify(bundle, objective.encoder())


def test_downstream_example_loads_the_bundle_with_both_libraries(zero_runs, tmp_path):
    bundle = str(tmp_path / "bundle")
    run_pretrain(["export", zero_runs["z2"], bundle])
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", "use_exported_encoder.py"), bundle],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "timm features (2, 17, 32), transformers features (2, 17, 32)" in result.stdout


RESUME = ["train.steps=16", "checkpoint.every=4", "checkpoint.keep_last=2", "data.num_workers=2",
          "distributed.zero_stage=2", "model.drop_path=0.1"]


def test_killed_run_resumed_with_auto_ends_with_the_same_weights(xray_shards, tmp_path):
    out = str(tmp_path)
    run_pretrain(train_args(out, "whole", xray_shards, *RESUME, "checkpoint.writer=inline", nproc=2))

    ckpts = os.path.join(out, "killed", "checkpoints")  # written in the background: the same weights as in place
    background = "checkpoint.writer=background"
    kill_after_checkpoint(train_args(out, "killed", xray_shards, *RESUME, background, nproc=2), ckpts, 8, 16)

    run_pretrain(train_args(out, "killed", xray_shards, *RESUME, background, "checkpoint.resume=auto", nproc=2))
    final = {name: checkpoint_weights(os.path.join(out, name, "checkpoints", "step_000016"))
             for name in ("whole", "killed")}
    assert_same_weights(final["whole"], final["killed"])
    for rank in range(2):  # the data stream and lineage continued exactly too
        states = [torch.load(os.path.join(out, name, "checkpoints", "step_000016", f"trainer_state_rank{rank}.pt"),
                             weights_only=False) for name in ("whole", "killed")]
        assert states[0]["data"] == states[1]["data"] and states[0]["lineage"] == states[1]["lineage"]
    steps = [step for step, _ in metric_history(os.path.join(out, "killed"))]  # one MLflow run, continued
    assert steps[-1] == 16 and set(range(1, 17)) <= set(steps)  # 16 steps: more than 2 passes over the shards
    assert len(checkpoint.complete_checkpoints(ckpts)) == 2


def test_resume_on_fewer_processes_reads_the_rest_of_the_pass_once(xray_shards, tmp_path):
    """2 processes x 2 workers read 32 of the 48 samples of a pass in 4 steps; 1 process resumes and reads the other
    16 in 4 more steps: the merged lineage then holds all 48, so none was read twice. (ZeRO 1-3 checkpoints resume
    on another process count too: tests/test_reshard_resume.py.)"""
    common = ["data.batch_size=4", "data.shuffle_buffer=0", "checkpoint.every=4", "tracking.system_metrics=false"]
    run_pretrain(train_args(str(tmp_path), "grow", xray_shards, *common, "data.num_workers=2", "train.steps=4",
                            nproc=2))
    result = run_pretrain(train_args(str(tmp_path), "grow", xray_shards, *common, "data.num_workers=0",
                                     "train.steps=8"))
    assert "dealt out to the new readers" in result.stderr
    (state,) = checkpoint.trainer_states(os.path.join(str(tmp_path), "grow", "checkpoints", "step_000008"))
    lineage = Lineage(state["lineage"])
    assert sum(end - start for spans in lineage.ranges.values() for start, end in spans) == 48


def test_divergence_stops_after_k_nonfinite_losses_keeping_the_last_good_checkpoint(xray_shards, tmp_path):
    result = run_pretrain(train_args(str(tmp_path), "diverge", xray_shards, "optim.lr=1e30", "optim.warmup_steps=0",
                                     "optim.clip_grad=0", "train.steps=20", "checkpoint.every=1",
                                     "train.max_nonfinite=3", "data.num_workers=0"), check=False)
    assert result.returncode != 0
    assert "3 non-finite losses in a row" in result.stderr
    latest = checkpoint.find_latest(os.path.join(str(tmp_path), "diverge", "checkpoints"))
    assert latest is not None and checkpoint.is_complete(latest)
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(latest).values())


def test_corrupt_sample_and_truncated_shard_are_skipped_counted_and_logged(xray_shards, tmp_path):
    spec = make_bad_shards(xray_shards, str(tmp_path))
    run_pretrain(train_args(str(tmp_path), "bad", spec, "data.num_workers=0", "data.batch_size=4",
                            "data.shuffle_buffer=0", "train.steps=8"))
    run = os.path.join(str(tmp_path), "bad")
    assert metric_history(run, "skipped_samples")[-1][1] >= 1
    assert metric_history(run, "shard_errors")[-1][1] >= 1


def test_bf16_short_run_and_export(xray_shards, tmp_path):
    run_pretrain(train_args(str(tmp_path), "bf16", xray_shards, "distributed.precision=bf16",
                            "distributed.zero_stage=1", "train.steps=2", "data.num_workers=0"))
    losses = metric_history(os.path.join(str(tmp_path), "bf16"))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    result = run_pretrain(["export", os.path.join(str(tmp_path), "bf16"), "--register", "xray-mae"])
    assert "registered as MLflow model xray-mae version 1" in result.stdout
    bundle = os.path.join(str(tmp_path), "bf16", "exports", "step_000002")
    assert os.path.isfile(os.path.join(bundle, "model.safetensors"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/bf16/mlflow.db")
    (version,) = client.search_model_versions("name='xray-mae'")
    assert version.source.endswith("exports/step_000002") and version.run_id
    assert os.path.isfile(os.path.join(version.source.replace("file://", ""), "model.safetensors"))
    check_lineage(bundle, xray_shards, tmp_path, consumed=2 * 8)
    assert_fp32_masters(bundle)


def assert_fp32_masters(bundle: str) -> None:
    """The bundle holds the optimizer's fp32 master weights: after a few steps some are off bf16's grid."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(bundle, "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in weights.values()), "bf16-rounded weights"


def test_zero0_bf16_export_writes_the_fp32_master_weights(xray_shards, tmp_path):
    run_pretrain(train_args(str(tmp_path), "bf16z0", xray_shards, "distributed.precision=bf16",
                            "distributed.zero_stage=0", "train.steps=2", "data.num_workers=0", nproc=1))
    run_pretrain(["export", os.path.join(str(tmp_path), "bf16z0")])
    assert_fp32_masters(os.path.join(str(tmp_path), "bf16z0", "exports", "step_000002"))


def check_lineage(bundle, shards, tmp_path, consumed):
    """The bundle's lineage lists exactly ``consumed`` of the shards' keys; the check flags those only."""
    from data_pipeline.lineage import shard_keys
    from data_pipeline.shards import resolve_shards

    lineage = json.load(open(os.path.join(bundle, "lineage.json")))
    everything = {key for url in resolve_shards(shards).urls for key in shard_keys(url)}
    seen = set(lineage["keys"])
    assert lineage["samples_consumed"] == consumed == len(seen) and seen <= everything
    overlapping, disjoint = tmp_path / "overlap.txt", tmp_path / "disjoint.txt"
    overlapping.write_text("\n".join(sorted(everything - seen)[:3] + sorted(seen)[:1]) + "\n")
    disjoint.write_text("\n".join(sorted(everything - seen)) + "\n")
    flagged = run_pretrain(["lineage", "check", bundle, str(overlapping)], check=False)
    assert flagged.returncode == 1 and f"1 of 4 keys were consumed in pretraining: {sorted(seen)[0]}" in flagged.stdout
    passed = run_pretrain(["lineage", "check", bundle, str(disjoint)], check=False)
    assert passed.returncode == 0 and "none of the" in passed.stdout
    sources = lineage["identities"]["source"]  # the files the consumed samples came from
    assert len(sources) == consumed
    (tmp_path / "sources.txt").write_text(sources[0] + "\nnever-sharded.png\n")
    flagged = run_pretrain(["lineage", "check", bundle, str(tmp_path / "sources.txt"), "--by", "source"], check=False)
    assert flagged.returncode == 1 and f"1 of 2 sources were consumed in pretraining: {sources[0]}" in flagged.stdout


def test_bad_config_and_missing_shards_fail_clearly_at_start(xray_shards, tmp_path):
    result = run_pretrain(["train", "model.dpeth=3"], check=False)
    assert result.returncode == 2 and "model.dpeth" in result.stderr
    missing = os.path.join(str(tmp_path), "nowhere-{000000..000001}.tar")
    result = run_pretrain(train_args(str(tmp_path), "missing", missing, "data.num_workers=0"), check=False)
    assert result.returncode == 2 and "nowhere-000000.tar: shard not found" in result.stderr


@pytest.fixture(scope="module")
def pydicom_shards(tmp_path_factory):
    """Shards written by the CLI from pydicom's real sample files (what `make demo` uses)."""
    import pydicom.data

    src = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    out = str(tmp_path_factory.mktemp("pydicom") / "shards")
    result = run_pretrain(["shards", "xray", src, out, "--samples-per-shard", "8", "--no-progress"])
    assert "skipped" in result.stdout
    return out


TESTED_ELSEWHERE = {"videomae_v2_tiny_video_cpu.yaml", "videomae_v2_tiny_ct_cpu.yaml", "mae_tiny_cpu.yaml",
                    "dinov2_tiny_cpu.yaml", "distill_g2sd_tiny_cpu.yaml", "distill_feature_tiny_cpu.yaml",
                    "distill_dino_tiny_cpu.yaml", "distill_registers_tiny_cpu.yaml", "distill_vitg_to_vitb_xray.yaml",
                    "distill_g2sd_vitb_to_vits_ct.yaml", "registers_posthoc_vitb.yaml",
                    "distill_students_tiny_cpu.yaml"}
"""Recipes other tests run in full: test_videomae_e2e.py (kill, resume, export), test_slurm.py (mae_tiny_cpu under
SLURM), test_dinov2_e2e.py (dinov2_tiny_cpu under ZeRO-2 and ZeRO-3), test_distill.py, test_distill_dino.py and
test_distill_registers.py and test_distill_students.py (the distillation recipes, from teachers they train)."""


def single_source_recipes() -> list:
    """Shipped recipes that read one source (the mixture recipe has its own test in test_mixture.py)."""
    from omegaconf import OmegaConf

    recipes = sorted(glob.glob(os.path.join(REPO, "pretrain", "configs", "*.yaml")))
    return [r for r in recipes if not OmegaConf.load(r).get("data", {}).get("sources")
            and os.path.basename(r) not in TESTED_ELSEWHERE]


@pytest.mark.parametrize("recipe", single_source_recipes(), ids=os.path.basename)
def test_every_shipped_recipe_runs_a_few_steps_at_tiny_size(recipe, pydicom_shards, tile_shards, video_shards,
                                                            ct_shards, tmp_path):
    from pretrain.config import load_config

    shards = {"pathology": tile_shards, "video": video_shards, "ct": ct_shards}.get(load_config(recipe).data.modality,
                                                                                  pydicom_shards)
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    assert manifest["total_samples"] >= 6 and (manifest["skipped"] or shards != pydicom_shards)
    run_pretrain(["train", "--config", recipe, *TINY, f"output_dir={tmp_path}", "name=recipe",
                  f"data.shards={shards}", "data.split_by=sample", "data.num_workers=0",
                  "data.batch_size=4", "distributed.precision=fp32", "train.steps=3", "train.log_every=1"])
    assert len(metric_history(os.path.join(str(tmp_path), "recipe"))) == 3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/recipe/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.data.params["data.source_files_skipped"] == str(len(manifest["skipped"]))
    assert run.data.params["data.manifest_samples"] == str(manifest["total_samples"])


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """scikit-learn's digits (a real labelled set), as labelled shards: true and shuffled labels."""
    from data_pipeline.writers import write_xray_shards
    from tests.conftest import write_digits

    root = tmp_path_factory.mktemp("digits")
    out = {}
    for name, shuffle in (("true", False), ("shuffled", True)):
        labels = write_digits(str(root / f"raw_{name}"), 500, shuffle_labels=shuffle)
        out[name] = str(root / name)
        write_xray_shards(str(root / f"raw_{name}"), out[name], 128, progress=False, labels=labels)
    return out


@pytest.mark.parametrize("labels", ["true", "shuffled"])
def test_probes_under_zero3_rise_above_chance_only_with_true_labels(digits_shards, xray_shards, labels, tmp_path):
    run_pretrain(train_args(str(tmp_path), "probed", xray_shards, "distributed.zero_stage=3", "data.batch_size=4",
                            "data.num_workers=0", "train.steps=4", "probe.every=2",
                            f"probe.shards={digits_shards[labels]}", "probe.max_samples=500", nproc=2))
    knn = metric_history(os.path.join(str(tmp_path), "probed"), "probe_knn_acc")
    linear = metric_history(os.path.join(str(tmp_path), "probed"), "probe_linear_acc")
    assert [step for step, _ in knn] == [0, 2, 4] and [step for step, _ in linear] == [0, 2, 4]  # 0: untrained
    if labels == "true":  # 10 classes: chance is 0.1
        assert min(v for _, v in knn) > 0.3 and min(v for _, v in linear) > 0.3
    else:
        assert max(v for _, v in knn) < 0.2 and max(v for _, v in linear) < 0.2
