"""Shared fixtures: tiny synthetic X-ray shards and a helper that runs the real ``pretrain`` CLI."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.write_shards import write_xray_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_xray(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth uint16 image with a bright blob: enough structure for MAE to learn something."""
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
    blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / radius**2)
    image = 0.3 * rows + 0.6 * blob + 0.05 * rng.standard_normal((height, width))
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 65535).astype(np.uint16)


def make_xray_folder(folder: str, count: int, seed: int = 0) -> str:
    """Write ``count`` 16-bit PNG X-rays of varying sizes into ``folder``."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        image = synthetic_xray(rng, int(rng.integers(64, 97)), int(rng.integers(64, 97)))
        Image.fromarray(image).save(os.path.join(folder, f"cxr_{index:03d}.png"))
    return folder


def write_digits(folder, count: int, shuffle_labels: bool = False) -> str:
    """scikit-learn's digits as 32x32 16-bit PNGs plus labels.csv; returns the CSV path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target[:count].copy()
    if shuffle_labels:
        np.random.default_rng(0).shuffle(labels)
    os.makedirs(folder, exist_ok=True)
    rows = [("path", "label")]
    for index in range(count):
        image = np.kron(digits.images[index], np.ones((4, 4))) / 16.0
        name = f"digit_{index:04d}.png"
        Image.fromarray((image * 65535).astype(np.uint16)).save(os.path.join(folder, name))
        rows.append((name, int(labels[index])))
    path = os.path.join(folder, "labels.csv")
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


@pytest.fixture(scope="session")
def xray_shards(tmp_path_factory) -> str:
    """A folder with 48 synthetic X-rays in 6 shards of 8, plus manifest.json."""
    root = tmp_path_factory.mktemp("xray")
    src = make_xray_folder(str(root / "raw"), 48)
    write_xray_shards(src, str(root / "shards"), samples_per_shard=8, progress=False)
    return str(root / "shards")


def make_bad_shards(good_shards: str, out: str) -> str:
    """Three shards in ``out``: a corrupt sample + 8 good ones, a shard cut in half, and an intact one.

    Returns:
        The brace spec of the three shards.
    """
    import shutil

    import webdataset

    with webdataset.TarWriter(os.path.join(out, "bad-000000.tar")) as writer:
        writer.write({"__key__": "broken", "png": b"not a png", "json": b"{}"})
        for sample in webdataset.WebDataset(os.path.join(good_shards, "xray-000000.tar"), shardshuffle=False):
            writer.write({"__key__": sample["__key__"], "png": sample["png"], "json": sample["json"]})
    with open(os.path.join(good_shards, "xray-000001.tar"), "rb") as handle:
        data = handle.read()
    with open(os.path.join(out, "bad-000001.tar"), "wb") as handle:
        handle.write(data[: len(data) // 2])
    shutil.copy(os.path.join(good_shards, "xray-000002.tar"), os.path.join(out, "bad-000002.tar"))
    return os.path.join(out, "bad-{000000..000002}.tar")


TINY = [
    "model.size=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32",
    "model.patch_size=8", "objective.mae.decoder_dim=32", "objective.mae.decoder_depth=1",
    "objective.mae.decoder_heads=2", "optim.warmup_steps=2", "optim.lr=1e-3", "data.shuffle_buffer=16",
]
"""Overrides that make a run tiny enough for a test."""


def run_pretrain(args, timeout: int = 300, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run ``python -m pretrain.main ARGS`` from the repository root and return the result."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "pretrain.main", *args], cwd=REPO, env=env, timeout=timeout,
                            capture_output=True, text=True, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def metric_history(run_dir: str, key: str = "loss") -> list:
    """[(step, value)] of a metric from the run's embedded MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    assert len(runs) == 1, f"expected one MLflow run in {run_dir}, found {len(runs)}"
    history = client.get_metric_history(runs[0].info.run_id, key)
    return sorted((m.step, m.value) for m in history)


def checkpoint_weights(path: str) -> dict:
    """Full fp32 weights of a checkpoint folder."""
    from pretrain.export import consolidated_state_dict

    return consolidated_state_dict(path)


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Same keys and tensors equal within ``atol``."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name} differs"
