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

from data_pipeline.writers import write_xray_shards
from tests.system_deps import pytest_report_header, pytest_terminal_summary  # noqa: F401 (pytest hooks)

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


def _digit_images(count: int, shuffle_labels: bool):
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target[:count].copy()
    if shuffle_labels:
        np.random.default_rng(0).shuffle(labels)
    return [np.kron(digits.images[i], np.ones((4, 4))) / 16.0 for i in range(count)], labels


def _labels_csv(folder: str, rows) -> str:
    path = os.path.join(folder, "labels.csv")
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label")] + list(rows))
    return path


def write_digit_clips(folder, count: int, frames: int = 16, shuffle_labels: bool = False) -> str:
    """scikit-learn's digits as short RGB clips (the 32x32 digit sliding across a 48x48 frame) plus
    labels.csv; returns the CSV path."""
    import av

    images, labels = _digit_images(count, shuffle_labels)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for index, image in enumerate(images):
        name = f"digit_{index:04d}.mp4"
        with av.open(os.path.join(folder, name), "w") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=25)
            stream.width = stream.height = 48
            stream.pix_fmt = "yuv420p"
            for t in range(frames):
                frame = np.zeros((48, 48, 3), np.uint8)
                frame[8:40, t:t + 32] = (image * 255).astype(np.uint8)[..., None]
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        rows.append((name, int(labels[index])))
    return _labels_csv(folder, rows)


def write_digit_volumes(folder, count: int, depth: int = 16, spacing=(2.5, 1.5, 1.5),
                        shuffle_labels: bool = False) -> str:
    """scikit-learn's digits as CT-like NIfTI volumes (the 32x32 digit extruded over ``depth`` slices,
    -160 HU background, +240 HU strokes) plus labels.csv; returns the CSV path."""
    import nibabel as nib

    images, labels = _digit_images(count, shuffle_labels)
    os.makedirs(folder, exist_ok=True)
    rows = []
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    for index, image in enumerate(images):
        hu = np.repeat((-160 + 400 * image)[None], depth, axis=0)  # [z, y, x]
        name = f"digit_{index:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16).transpose(2, 1, 0), affine), os.path.join(folder, name))
        rows.append((name, int(labels[index])))
    return _labels_csv(folder, rows)


def make_tile_folder(folder: str, slides: int, tiles_per_slide: int, size: int = 48, seed: int = 0) -> str:
    """Synthetic H&E-like RGB JPEG tiles, one sub-folder per slide, named ``tile_x{X}_y{Y}.jpg``."""
    rng = np.random.default_rng(seed)
    haematoxylin, eosin = np.array([0.35, 0.2, 0.55]), np.array([0.9, 0.45, 0.7])
    for slide in range(slides):
        os.makedirs(os.path.join(folder, f"slide_{slide:02d}"), exist_ok=True)
        for index in range(tiles_per_slide):
            rows, cols = np.mgrid[0:size, 0:size] / size
            nuclei = sum(np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / 0.004) for y, x in rng.uniform(0, 1, (6, 2)))
            mix = np.clip(nuclei, 0, 1)[..., None]
            image = (1 - mix) * eosin + mix * haematoxylin + 0.03 * rng.standard_normal((size, size, 3))
            name = f"tile_x{index * size}_y{slide * size}.jpg"
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
                os.path.join(folder, f"slide_{slide:02d}", name), quality=90)
    return folder


@pytest.fixture(scope="session")
def tile_shards(tmp_path_factory) -> str:
    """24 synthetic pathology tiles from 3 slides in 3 shards of 8, plus manifest.json."""
    from data_pipeline.writers import write_tile_shards

    root = tmp_path_factory.mktemp("tiles")
    make_tile_folder(str(root / "raw"), 3, 8)
    write_tile_shards(str(root / "raw"), str(root / "shards"), samples_per_shard=8, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="session")
def video_shards(tmp_path_factory) -> str:
    """6 synthetic H.264 clips (24 frames, 64 x 48) in 3 shards of 2, plus manifest.json."""
    from data_pipeline.synthetic import write_video
    from data_pipeline.writers import write_video_shards

    root = tmp_path_factory.mktemp("video")
    (root / "raw").mkdir()
    for index in range(6):
        write_video(str(root / "raw" / f"clip{index}.mp4"), frames=24, width=64, height=48, seed=index)
    write_video_shards(str(root / "raw"), str(root / "shards"), samples_per_shard=2, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="session")
def ct_shards(tmp_path_factory) -> str:
    """6 synthetic CT volumes (NIfTI, 24 x 40 x 40 at 2.5 x 0.8 x 0.8 mm) in 3 shards of 2, plus manifest.json."""
    from data_pipeline.writers import write_ct_shards
    from data_pipeline.synthetic import write_nifti

    root = tmp_path_factory.mktemp("ct")
    (root / "raw").mkdir()
    for index in range(6):
        write_nifti(str(root / "raw" / f"volume{index}.nii.gz"), seed=index)
    write_ct_shards(str(root / "raw"), str(root / "shards"), samples_per_shard=2, progress=False)
    return str(root / "shards")


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
    "objective.dinov2.head_prototypes=64", "objective.dinov2.ibot_prototypes=64", "objective.dinov2.head_hidden_dim=32",
    "objective.dinov2.head_bottleneck_dim=16", "objective.dinov2.local_crops_number=2",
    "objective.dinov2.local_crops_size=16",
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


def mask_shards(kind: str, sources, masks, root, samples_per_shard: int) -> dict:
    """``pretrain shards KIND sources --masks`` twice: ``{"true": shards with the masks, "shuffled": shards with
    each sample's mask replaced by another's (a fixed shuffle)}``, under ``root``."""
    import random
    import shutil

    files = sorted(os.listdir(masks))
    shuffled = files[:]
    random.Random(0).shuffle(shuffled)
    os.makedirs(os.path.join(root, "shuffled"))
    for name, other in zip(files, shuffled):
        shutil.copy(os.path.join(masks, other), os.path.join(root, "shuffled", name))
    out = {}
    for name, folder in (("true", str(masks)), ("shuffled", os.path.join(root, "shuffled"))):
        out[name] = os.path.join(root, name, "shards")
        run_pretrain(["shards", kind, str(sources), out[name], "--masks", folder, "--samples-per-shard",
                      str(samples_per_shard), "--no-progress"])
    return out


def train_teacher(tmp_path_factory, folder: str, shards: str, *extra: str, recipe: str = None) -> str:
    """Train a tiny teacher run named ``teacher`` on 1 process (``TINY`` plus ``extra``) and return its run folder."""
    out = str(tmp_path_factory.mktemp(folder))
    config = ["--config", recipe] if recipe else []
    run_pretrain(["train", *config, *TINY, f"output_dir={out}", "name=teacher", f"data.shards={shards}",
                  "data.split_by=sample", "data.num_workers=0", *extra])
    return os.path.join(out, "teacher")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a node failure would."""
    import psutil

    parent = psutil.Process(pid)
    descendants = parent.children(recursive=True)
    parent.kill()
    for process in descendants:
        process.kill()
    psutil.wait_procs(descendants, timeout=30)  # the parent is left for Popen.wait to reap


def kill_after_checkpoint(args, ckpt_dir: str, step: int, last_step: int, timeout: int = 240) -> str:
    """Start ``pretrain ARGS``, SIGKILL its whole process tree once a checkpoint at ``step`` or later is
    complete, and return that checkpoint (asserting the run was cut short of ``last_step``)."""
    import signal
    import time

    from pretrain import checkpoint

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.main", *args], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        latest = checkpoint.find_latest(ckpt_dir)
        if latest and int(os.path.basename(latest).split("_")[1]) >= step:
            break
        time.sleep(0.02)
    kill_tree(proc.pid)  # torchrun starts its workers in sessions of their own: kill every process
    proc.wait()
    killed_at = checkpoint.find_latest(ckpt_dir)
    assert proc.returncode == -signal.SIGKILL, f"run ended by itself ({proc.returncode}) before the kill"
    assert killed_at and not killed_at.endswith(f"step_{last_step:06d}"), "run was not cut short"
    return killed_at


def resume_after_kill(args, run_dir: str, reference_run: str, step: int, last_step: int) -> str:
    """Kill ``pretrain ARGS`` (a run writing ``run_dir``) once its checkpoint at ``step`` is complete, run it
    again to ``last_step``, assert its final weights are ``reference_run``'s (the same run uninterrupted)
    exactly, and return its final checkpoint."""
    ckpts = os.path.join(run_dir, "checkpoints")
    kill_after_checkpoint(args, ckpts, step, last_step)
    run_pretrain(args)
    final = f"step_{last_step:06d}"
    assert_same_weights(checkpoint_weights(os.path.join(reference_run, "checkpoints", final)),
                        checkpoint_weights(os.path.join(ckpts, final)))
    return os.path.join(ckpts, final)


def metric_history(run_dir: str, key: str = "loss") -> list:
    """[(step, value)] of a metric from the run's embedded MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    assert len(runs) == 1, f"expected one MLflow run in {run_dir}, found {len(runs)}"
    history = client.get_metric_history(runs[0].info.run_id, key)
    return sorted((m.step, m.value) for m in history)


def checkpoint_weights(path: str) -> dict:
    """Full fp32 weights of a checkpoint folder (several students': each one's, as ``<student>/<name>``)."""
    from pretrain.restore import consolidated_state_dict
    from pretrain.students import saved_students, student_folder

    names = saved_students(path)
    if not names:
        return consolidated_state_dict(path)
    return {f"{name}/{key}": value for name in names
            for key, value in consolidated_state_dict(student_folder(path, name)).items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Same keys and tensors equal within ``atol``."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"{name} differs"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, started with `pretrain mlflow-server`; yields its URL."""
    from tests.servers import MLflowServer

    server = MLflowServer(str(tmp_path_factory.mktemp("mlflow_server")), REPO).start()
    yield server.url
    server.stop()
