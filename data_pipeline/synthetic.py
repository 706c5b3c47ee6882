"""Small synthetic media with the structure of real data, for tests, benchmarks and the mixture demo.

No download is possible on our machines, and installed packages ship X-rays (pydicom) and
volumes (nibabel, pydicom series) but no whole-slide images or videos, so these writers
make them: a pyramidal tiled TIFF slide with pink "tissue" blobs on white glass and its
resolution in the TIFF tags, and H.264 clips of moving shapes.
"""
from __future__ import annotations

import numpy as np


def write_slide(path: str, width: int = 1024, height: int = 768, mpp: float = 0.25, seed: int = 0,
                blobs: int = 3, levels: int = 3) -> None:
    """A pyramidal (``levels`` levels, /2 each) tiled RGB TIFF slide with H&E-coloured blobs on white.

    The resolution tags say ``mpp`` microns per pixel (tiffslide and OpenSlide read them).
    """
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.full((height, width, 3), 242, np.uint8)
    for _ in range(blobs):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        radius = rng.uniform(0.12, 0.25) * min(width, height)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        texture = rng.integers(0, 40, size=(height, width, 1))
        colour = np.array([200, 90, 160]) - texture  # eosin pink with hematoxylin-purple speckle
        image[inside] = np.clip(colour, 0, 255)[inside].astype(np.uint8)
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        level = image
        for index in range(levels):
            options = dict(tile=(128, 128), photometric="rgb", compression="zlib",
                           resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
            if index == 0:
                tif.write(level, subifds=levels - 1, **options)
            else:
                tif.write(level, subfiletype=1, **options)
            level = level[::2, ::2]


def write_video(path: str, frames: int = 48, width: int = 96, height: int = 64, fps: int = 25,
                seed: int = 0) -> None:
    """An H.264 (or MPEG-4) clip of a bright square moving over a gradient, ``frames`` long."""
    import av

    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, max(1, width - 16)), rng.integers(0, max(1, height - 16))
    dx, dy = rng.choice([-2, -1, 1, 2]), rng.choice([-2, -1, 1, 2])
    background = np.linspace(30, 120, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = background.copy()
            frame[y:y + 16, x:x + 16] = (230, 200, 60)
            x, y = (x + dx) % (width - 16), (y + dy) % (height - 16)
            image = np.ascontiguousarray(frame.astype(np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_nifti(path: str, shape=(24, 40, 40), spacing=(2.5, 0.8, 0.8), seed: int = 0) -> None:
    """A CT-like NIfTI volume (air around a soft-tissue ellipsoid with a bone ring), int16 HU, RAS affine.

    ``shape`` and ``spacing`` are ``[z, y, x]``; the file stores ``[x, y, z]`` as NIfTI does.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    centre = [(n - 1) / 2 for n in shape]
    radius = ((z - centre[0]) / (shape[0] / 2)) ** 2 + ((y - centre[1]) / (shape[1] / 2.4)) ** 2 \
        + ((x - centre[2]) / (shape[2] / 2.2)) ** 2
    hu = np.full(shape, -1000.0)
    hu[radius < 1.0] = 40.0
    hu[(radius > 0.8) & (radius < 1.0)] = 700.0
    hu += rng.normal(0, 15, shape)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16).transpose(2, 1, 0), affine), path)


def write_segmentation(out: str, index: int, size: int = 64, seed: int = 0) -> None:
    """``out/images/seg_NNN.png`` (8-bit gray) and its mask ``out/masks/seg_NNN.png``: a striped, noisy background
    (class 0) with a disc (class 1, brighter, speckled) and a square (class 2, darker, checkered) at random places
    and sizes, for the dense probe."""
    import os

    from PIL import Image

    rng = np.random.default_rng(seed * 1000 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    image = 0.45 + 0.1 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.6 + phase)
    mask = np.zeros((size, size), np.uint8)
    radius = rng.uniform(0.15, 0.25) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
    image[disc], mask[disc] = 0.8 + 0.1 * rng.standard_normal(disc.sum()), 1
    side = int(rng.uniform(0.25, 0.4) * size)
    top, left = rng.integers(0, size - side, 2)
    square = np.zeros_like(disc)
    square[top:top + side, left:left + side] = True
    checker = ((yy // 4 + xx // 4) % 2).astype(np.float32)
    image[square], mask[square] = (0.1 + 0.15 * checker)[square], 2
    image += 0.03 * rng.standard_normal(image.shape)
    for folder, array in (("images", np.clip(image, 0, 1) * 255), ("masks", mask)):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(os.path.join(out, folder, f"seg_{index:03d}.png"))


def write_ct_segmentation(out: str, index: int, shape=(16, 32, 32), seed: int = 0) -> None:
    """``out/volumes/ct_NNN.nii.gz`` (int16 HU, 1 mm voxels) and its labels ``out/masks/ct_NNN.nii.gz``: striped soft
    tissue (class 0) with a ball (class 1, bright, speckled) and a box (class 2, fat-like, checkered) at random
    places and sizes, for the dense probe in 3D."""
    import os

    import nibabel as nib

    rng = np.random.default_rng(seed * 1000 + index)
    zz, yy, xx = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    hu = 40 + 30 * np.sin((xx + yy + zz) * 0.7 + phase)
    labels = np.zeros(shape, np.uint8)
    radius = rng.uniform(0.35, 0.45) * min(shape)
    centre = [rng.uniform(radius, n - radius) for n in shape]
    ball = sum((axis - c) ** 2 for axis, c in zip((zz, yy, xx), centre)) < radius ** 2
    hu[ball], labels[ball] = 400 + 60 * rng.standard_normal(ball.sum()), 1
    sides = [int(rng.uniform(0.45, 0.6) * n) for n in shape]
    start = [int(rng.integers(0, n - side + 1)) for n, side in zip(shape, sides)]
    box = np.zeros(shape, bool)
    box[tuple(slice(a, a + side) for a, side in zip(start, sides))] = True
    checker = ((zz // 4 + yy // 4 + xx // 4) % 2).astype(np.float32)
    hu[box], labels[box] = (-150 + 100 * checker)[box], 2
    hu += 10 * rng.standard_normal(shape)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for folder, array in (("volumes", np.rint(hu).astype(np.int16)), ("masks", labels)):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine), os.path.join(out, folder, f"ct_{index:03d}.nii.gz"))


def main(argv=None) -> int:
    """``python -m data_pipeline.synthetic slides|videos|ct|segmentation|ct-segmentation OUT --count N``: write
    synthetic sources for demos (segmentation: OUT/images and their masks in OUT/masks, for ``pretrain shards xray
    ... --masks``; ct-segmentation: OUT/volumes and their labels in OUT/masks, for ``pretrain shards ct ... --masks``)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=main.__doc__)
    parser.add_argument("kind", choices=["slides", "videos", "ct", "segmentation", "ct-segmentation"])
    parser.add_argument("out", help="folder to write into (created)")
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for index in range(args.count):
        if args.kind == "slides":
            write_slide(os.path.join(args.out, f"slide_{index:03d}.tif"), seed=index)
        elif args.kind == "segmentation":
            write_segmentation(args.out, index)
        elif args.kind == "ct-segmentation":
            write_ct_segmentation(args.out, index)
        elif args.kind == "videos":
            write_video(os.path.join(args.out, f"clip_{index:03d}.mp4"), seed=index)
        else:
            write_nifti(os.path.join(args.out, f"volume_{index:03d}.nii.gz"), seed=index)
    print(f"{args.count} synthetic {args.kind} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
