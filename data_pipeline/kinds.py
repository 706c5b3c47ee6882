"""The shard kinds behind ``pretrain shards <kind>``: where each finds its sources and how it makes samples.

A kind is a :class:`ShardKind`: the modality its shards hold (and are named by), ``sources(src)`` (the
sources under SRC, ``[(name relative to SRC, item)]``, sorted, so deterministic; an item is a file path,
a DICOM series or a slide and must survive JSON, since the conversion plan stores it),
``sample_maker(**options)`` (returns ``make_samples(item, rel) -> [(key, {extension: bytes})]``, raising
:class:`~data_pipeline.errors.BadInputError` for a source to skip; its keyword arguments are the kind's
options and their defaults) and the default samples per shard. :mod:`data_pipeline.conversion` turns a
kind into shards; :mod:`data_pipeline.writers` holds the ``write_<kind>_shards`` entry points.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from data_pipeline.ct_io import ct_sources
from data_pipeline.video_io import is_video_file, video_samples
from data_pipeline.volume_masks import ct_samples
from data_pipeline.write_shards import is_tile_file, source_items, tile_samples, xray_samples
from data_pipeline.wsi_io import is_slide_file, wsi_samples
from data_pipeline.xray_io import is_xray_file


@dataclass(frozen=True)
class ShardKind:
    modality: str
    sources: Callable[[str], list]
    sample_maker: Callable[..., Callable]
    samples_per_shard: int
    one_sample_per_source: bool = True


def files(accept: Callable[[str], bool]) -> Callable[[str], list]:
    """``sources`` for kinds whose sources are the accepted files under SRC."""
    return lambda src: source_items(src, accept)


KINDS = {
    "xray": ShardKind("xray", files(is_xray_file), xray_samples, 256),
    "tiles": ShardKind("pathology", files(is_tile_file), tile_samples, 256),
    "ct": ShardKind("ct", ct_sources, ct_samples, 16),
    "wsi": ShardKind("pathology", files(is_slide_file), wsi_samples, 256, one_sample_per_source=False),
    "video": ShardKind("video", files(is_video_file), video_samples, 32),
}
