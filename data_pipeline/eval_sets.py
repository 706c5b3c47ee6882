"""Small labelled evaluation sets (for probes), read whole into memory once.

The shards are those of any modality (``pretrain shards xray|tiles|ct|video SRC OUT --labels
labels.csv``) with an integer label (``cls``) beside the image, volume or clip. Each sample
goes through its modality preparer's deterministic evaluation path
(:meth:`~data_pipeline.modalities.ModalityPreparer.evaluate`: centred crops, slab levels and
frames, no augmentation); undecodable or unlabelled samples are skipped and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List

import torch
from webdataset.tariterators import group_by_keys

from data_pipeline.decoders import decode_class
from data_pipeline.errors import BadInputError
from data_pipeline.shards import check_shards_exist, resolve_shards, tar_members

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """An evaluation set in memory."""

    inputs: torch.Tensor
    """[N, C, S, S] images, [N, C, D, S, S] volumes or [N, C, T, S, S] clips, normalised."""
    labels: torch.Tensor
    """[N] int64 labels."""
    keys: List[str]
    """Sample keys, in shard order."""
    skipped: int = 0
    """Samples that could not be decoded or had no label."""


def _label(raw: dict, where: str) -> int:
    if "cls" not in raw:
        raise BadInputError(where, "sample has no .cls label")
    try:
        return decode_class(raw["cls"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(where, f"cannot decode .cls: {exc}") from exc


def load_labelled_set(spec: str, preparer, max_samples: int) -> LabelledSet:
    """Read up to ``max_samples`` labelled samples from the shards named by ``spec`` (shard order).

    Args:
        preparer: the modality preparer (:func:`data_pipeline.modalities.build_preparer`) whose
            ``evaluate(raw)`` gives a sample's input tensor.

    Raises:
        BadInputError: missing shards, or no usable labelled sample at all.
    """
    urls = resolve_shards(spec).urls
    check_shards_exist(urls)
    inputs, labels, keys, skipped = [], [], [], 0
    for url in urls:
        try:
            for raw in group_by_keys(tar_members(url)):
                if len(inputs) >= max_samples:
                    break
                where = f"{url}:{raw['__key__']}"
                try:
                    label = _label(raw, where)
                    inputs.append(preparer.evaluate(raw))
                except BadInputError as exc:
                    skipped += 1
                    log.warning("evaluation set: skipping %s", exc)
                    continue
                labels.append(label)
                keys.append(raw["__key__"])
        except BadInputError as exc:
            log.warning("evaluation set: %s", exc)
        if len(inputs) >= max_samples:
            break
    if not inputs:
        raise BadInputError(spec, "no labelled samples (input + .cls) in the evaluation shards")
    return LabelledSet(torch.stack(inputs), torch.tensor(labels, dtype=torch.int64), keys, skipped)
