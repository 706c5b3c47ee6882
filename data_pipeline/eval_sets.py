"""Small labelled evaluation sets (for probes), read whole into memory once.

The shards hold an image (``png`` or ``jpg``) and an integer label (``cls``), as written by
``pretrain shards xray|tiles SRC OUT --labels labels.csv``. Images get the deterministic
:class:`~data_pipeline.transforms_2d.EvalView`; undecodable samples are skipped and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List

import torch
from webdataset.tariterators import group_by_keys

from data_pipeline.decoders import decode_sample, image_of
from data_pipeline.errors import BadInputError
from data_pipeline.shards import check_shards_exist, resolve_shards, tar_members
from data_pipeline.transforms_2d import EvalView, to_unit_tensor

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """An evaluation set in memory."""

    images: torch.Tensor
    """[N, C, S, S] normalised views."""
    labels: torch.Tensor
    """[N] int64 labels."""
    keys: List[str]
    """Sample keys, in shard order."""
    skipped: int = 0
    """Samples that could not be decoded or had no label."""


def load_labelled_set(spec: str, view: EvalView, max_samples: int) -> LabelledSet:
    """Read up to ``max_samples`` labelled samples from the shards named by ``spec`` (shard order).

    Raises:
        BadInputError: missing shards, or no usable labelled sample at all.
    """
    urls = resolve_shards(spec).urls
    check_shards_exist(urls)
    images, labels, keys, skipped = [], [], [], 0
    for url in urls:
        try:
            for raw in group_by_keys(tar_members(url)):
                if len(images) >= max_samples:
                    break
                where = f"{url}:{raw['__key__']}"
                try:
                    sample = decode_sample(raw)
                    if "cls" not in sample:
                        raise BadInputError(where, "sample has no .cls label")
                    images.append(view(to_unit_tensor(image_of(sample, where), where), where))
                except BadInputError as exc:
                    skipped += 1
                    log.warning("evaluation set: skipping %s", exc)
                    continue
                labels.append(int(sample["cls"]))
                keys.append(raw["__key__"])
        except BadInputError as exc:
            log.warning("evaluation set: %s", exc)
        if len(images) >= max_samples:
            break
    if not images:
        raise BadInputError(spec, "no labelled samples (image + .cls) in the evaluation shards")
    return LabelledSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys, skipped)
