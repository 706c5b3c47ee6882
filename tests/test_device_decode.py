"""data.decode_device: the setting, the fallback without a GPU, the views' draw/apply split (bit-identical to the
views as they were made before it), and the device path (decode and views in the training process) against
the CPU path: run here with torchvision's CPU decoder standing in for nvjpeg, and on a GPU by the gpu test."""
import dataclasses
import io
import itertools
import logging
import math

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from webdataset.tariterators import group_by_keys

from data_pipeline import device_decode
from data_pipeline.decoders import decode_image
from data_pipeline.encodings import encode_image
from data_pipeline.device_decode import ENCODED, TOLERANCE, DeviceDecode, decode_device, pack
from data_pipeline.errors import BadInputError
from data_pipeline.modalities import build_preparer
from data_pipeline.photometric import chance, uniform
from data_pipeline.pipelines import build_loader
from data_pipeline.shards import resolve_shards, tar_members
from data_pipeline.transforms_2d import random_resized_crop_box
from data_pipeline.views import build_view
from pretrain.config import ConfigError, load_config
from pretrain.config_data import DataConfig, PhotometricConfig, TransformConfig
from pretrain.objectives.base import DataSpec

MULTICROP = DataSpec(kind="multicrop", img_size=32, in_chans=3, local_crops=3, local_size=16)
SINGLE = DataSpec(kind="single", img_size=32, in_chans=3)
AUGMENTED = ["data.transforms.hflip=true", "data.transforms.vflip=true", "data.transforms.rotate90=true",
             "data.transforms.crop_scale=[0.2,1.0]"]


# The views as they were made before drawing and applying were split (data_pipeline/views.py and
# photometric.py at 55e9d52), kept here as the reference the split must reproduce bit for bit.

def old_crop(view, image, size, scale, gen):
    top, left, crop_h, crop_w = random_resized_crop_box(image.shape[-2], image.shape[-1], scale, view.ratio, gen)
    out = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True)
    if view.hflip and torch.rand(1, generator=gen).item() < 0.5:
        out = TF.horizontal_flip(out)
    if view.vflip and torch.rand(1, generator=gen).item() < 0.5:
        out = TF.vertical_flip(out)
    if view.rotate90:
        out = torch.rot90(out, int(torch.randint(0, 4, (1,), generator=gen).item()), dims=(-2, -1))
    return out


def old_intensity(image, brightness, contrast, gen):
    image = TF.adjust_brightness(image, uniform(gen, max(0.0, 1 - brightness), 1 + brightness))
    return TF.adjust_contrast(image, uniform(gen, max(0.0, 1 - contrast), 1 + contrast)).clamp(0, 1)


def old_rgb(image, cfg, gen):
    factors = [(TF.adjust_brightness, uniform(gen, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
               (TF.adjust_contrast, uniform(gen, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
               (TF.adjust_saturation, uniform(gen, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
               (TF.adjust_hue, uniform(gen, -cfg.hue, cfg.hue))]
    for index in torch.randperm(4, generator=gen).tolist():
        adjust, factor = factors[index]
        image = adjust(image, factor)
    return image.clamp(0, 1)


def old_stain(image, sigma, gen):
    from data_pipeline.photometric import _HED_TO_RGB_OD, _RGB_OD_TO_HED

    alpha = 1 - sigma + 2 * sigma * torch.rand(3, generator=gen)
    beta = -sigma + 2 * sigma * torch.rand(3, generator=gen)
    od = -torch.log(image.clamp(min=1 / 255)).permute(1, 2, 0)
    od = (od @ _RGB_OD_TO_HED * alpha + beta) @ _HED_TO_RGB_OD
    return torch.exp(-od).permute(2, 0, 1).clamp(0, 1)


def old_photometric(image, mode, cfg, blur_probability, solarize_probability, gen):
    jitter = chance(gen, cfg.jitter_probability)
    if mode == "intensity" and jitter:
        image = old_intensity(image, cfg.brightness, cfg.contrast, gen)
    elif mode == "rgb":
        if jitter:
            image = old_rgb(image, cfg, gen)
        if chance(gen, cfg.grayscale_probability):
            image = TF.rgb_to_grayscale(image, num_output_channels=image.shape[0])
    elif mode == "stain" and jitter:
        image = old_intensity(old_stain(image, cfg.stain_sigma, gen), cfg.brightness, cfg.contrast, gen)
    if chance(gen, blur_probability):
        sigma = uniform(gen, cfg.blur_sigma[0], cfg.blur_sigma[1])
        kernel = 2 * math.ceil(3 * sigma) + 1
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    if chance(gen, solarize_probability):
        image = torch.where(image >= 0.5, 1.0 - image, image)
    return image


def old_multicrop(view, image, gen):
    spec, cfg, blur = view.spec, view.photometric, list(view.photometric.blur_probability)
    image = view.match_channels(image, "x")
    crops = {"global_crops": [], "local_crops": []}
    for index in range(2):
        crop = old_crop(view, image, spec.img_size, spec.global_scale, gen)
        crop = old_photometric(crop, view.mode, cfg, blur[index], cfg.solarize_probability if index else 0.0, gen)
        crops["global_crops"].append(view.normalise(crop))
    for _ in range(spec.local_crops):
        crop = old_photometric(old_crop(view, image, spec.local_size, spec.local_scale, gen), view.mode, cfg,
                               blur[2], 0.0, gen)
        crops["local_crops"].append(view.normalise(crop))
    return {name: torch.stack(values) for name, values in crops.items()}


@pytest.mark.parametrize("colour", ["stain", "rgb", "intensity", "none"])
def test_drawing_then_applying_makes_the_views_the_single_call_made_bit_for_bit(colour):
    cfg = TransformConfig(hflip=True, vflip=True, rotate90=True, crop_scale=[0.2, 1.0], mean=[0.5] * 3,
                          std=[0.25] * 3, photometric=PhotometricConfig(colour=colour, grayscale_probability=0.5))
    multicrop, single = build_view(MULTICROP, cfg, "pathology"), build_view(SINGLE, cfg, "pathology")
    images = [torch.rand(3, 61, 75, generator=torch.Generator().manual_seed(1)),
              torch.rand(1, 40, 52, generator=torch.Generator().manual_seed(2))]  # a gray tile is repeated
    for seed, image in itertools.product(range(3), images):
        made = multicrop(image, torch.Generator().manual_seed(seed), "x")
        old = old_multicrop(multicrop, image, torch.Generator().manual_seed(seed))
        assert all(torch.equal(made[name], old[name]) for name in old)
        gen = torch.Generator().manual_seed(seed)
        old_single = single.normalise(old_crop(single, single.match_channels(image, "x"), 32, single.scale, gen))
        assert torch.equal(single(image, torch.Generator().manual_seed(seed), "x")["image"], old_single)
        drawn = multicrop.draw(image.shape, torch.Generator().manual_seed(seed))  # the two halves on their own
        assert all(torch.equal(multicrop.apply(multicrop.match_channels(image, "x"), drawn)[name], old[name])
                   for name in old)


def test_decode_device_is_cpu_or_cuda_in_the_config_and_in_the_loader():
    assert DataConfig().decode_device == "cpu"
    with pytest.raises(ConfigError, match=r"data.decode_device='gpu' is not one of \['cpu', 'cuda'\]"):
        load_config(None, ["data.decode_device=gpu"])
    with pytest.raises(ValueError, match="data.decode_device='nvjpeg' is not one of"):
        decode_device("nvjpeg")
    assert decode_device("cpu") is None


def test_cuda_without_a_gpu_warns_once_and_keeps_the_cpu_path(tiles_cfg, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_decode, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="data_pipeline.device_decode"):
        assert decode_device("cuda") is None and decode_device("cuda") is None
        loader = build_loader(data_config(tiles_cfg, decode="cuda"), MULTICROP, seed=0, rank=0, world_size=1)[0]
    assert loader.decode is None
    warnings = [r.message for r in caplog.records if "decode_device=cuda" in r.message]
    assert len(warnings) == 1 and "no CUDA device" in warnings[0] and "CPU path" in warnings[0]


@pytest.fixture(scope="module")
def tiles_cfg(tile_shards):
    """The run config of the tile shards (loaded once: loading a config takes seconds here)."""
    return load_config(None, [f"data.shards={tile_shards}", "data.modality=pathology", "data.batch_size=4",
                              "data.split_by=sample", "model.in_chans=3", "data.transforms.mean=[0.6,0.5,0.6]",
                              "data.transforms.std=[0.2,0.25,0.2]", *AUGMENTED])


def data_config(cfg, workers: int = 0, decode: str = "cpu"):
    return dataclasses.replace(cfg.data, num_workers=workers, decode_device=decode)


def differences(cpu: dict, device: dict, std: torch.Tensor) -> tuple:
    """(max, mean) absolute difference of two batches' float views in [0, 1] pixel units (normalisation undone:
    the mean cancels, the std scales)."""
    worst, total, count = 0.0, 0.0, 0
    for name, value in cpu.items():
        if torch.is_tensor(value) and value.is_floating_point():
            diff = ((value - device[name].cpu()) * std).abs()
            worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    return worst, total / count


def compare_paths(cfg, spec, workers: int, device: str, batches: int = 2) -> tuple:
    std = torch.tensor(cfg.data.transforms.std)[:, None, None]
    data = data_config(cfg, workers)
    cpu = list(itertools.islice(build_loader(data, spec, seed=3, rank=0, world_size=1)[0], batches))
    on = list(itertools.islice(build_loader(data, spec, seed=3, rank=0, world_size=1, decode_on=device)[0], batches))
    for a, b in zip(cpu, on):
        assert a["key"] == b["key"] and torch.equal(a["seed"], b["seed"]) and ENCODED not in b
        assert {name for name in a if torch.is_tensor(a[name])} == {name for name in b if torch.is_tensor(b[name])}
        assert all(b[name].shape == a[name].shape for name in a if torch.is_tensor(a[name]))
    return [differences(a, b, std) for a, b in zip(cpu, on)], on


@pytest.mark.parametrize("spec,workers", [(MULTICROP, 0), (SINGLE, 1)])
def test_the_device_path_on_the_cpu_equals_the_cpu_path_within_tolerance(tiles_cfg, spec, workers):
    """torchvision's CPU decode_jpeg stands in for nvjpeg: the same samples, shapes and masks; views within
    TOLERANCE (libjpeg-turbo on both sides here: measured equal)."""
    found, _ = compare_paths(tiles_cfg, spec, workers, "cpu")
    assert all(worst <= TOLERANCE["max_abs"] and mean <= TOLERANCE["mean_abs"] for worst, mean in found), found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_views_equal_the_cpu_path_within_tolerance(tiles_cfg):
    found, on = compare_paths(tiles_cfg, MULTICROP, 1, "cuda", batches=4)
    assert on[0]["global_crops"].is_cuda
    assert all(worst <= TOLERANCE["max_abs"] and mean <= TOLERANCE["mean_abs"] for worst, mean in found), found


def raw_tiles(shards: str, count: int) -> list:
    return list(itertools.islice(group_by_keys(tar_members(resolve_shards(shards).urls[0])), count))


def test_png_and_npy_tiles_are_decoded_on_the_host_and_truncated_jpegs_refused_in_the_worker(tiles_cfg, tile_shards):
    source = tiles_cfg.data.sources[0]
    views = build_preparer(source, MULTICROP)
    encoded = build_preparer(source, MULTICROP, encoded=True)
    raws = raw_tiles(tile_shards, 4)
    png = io.BytesIO()
    Image.open(io.BytesIO(raws[1].pop("jpg"))).save(png, format="PNG")
    raws[1]["png"] = png.getvalue()
    raws[2]["npy"] = encode_image(decode_image(raws[2].pop("jpg")), "npy")[1]  # --encoding npy
    samples = [encoded(raw, 7 + index) for index, raw in enumerate(raws)]
    assert [s[ENCODED].on_device for s in samples] == [True, False, False, True]
    batch = DeviceDecode({source.name: encoded.view}, "cpu")({ENCODED: pack([s[ENCODED] for s in samples]),
                                                              "source": source.name})
    for row, raw in enumerate(raws):
        expected = views(raw, 7 + row)
        assert all(torch.equal(batch[name][row], expected[name]) for name in ("global_crops", "local_crops"))
    truncated = dict(raws[0], jpg=bytes(raws[0]["jpg"])[:-200])
    with pytest.raises(BadInputError, match="cannot decode image"):
        encoded(truncated, 0)
