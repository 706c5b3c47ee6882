"""Small labelled evaluation sets (for probes), read whole into memory once.

The shards are those of any modality (``pretrain shards xray|tiles|ct|video SRC OUT --labels
labels.csv``) with an integer label (``cls``) beside the image, volume or clip, and/or (images and CT volumes,
``--masks DIR``) a segmentation mask (``seg.png``, :mod:`data_pipeline.masks`; ``seg.npy`` beside a volume,
:mod:`data_pipeline.volume_masks`) for the dense probe. Each sample
goes through its modality preparer's deterministic evaluation path
(:meth:`~data_pipeline.modalities.ModalityPreparer.evaluate`: centred crops, slab levels and
frames, no augmentation); undecodable or unlabelled samples are skipped and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
from webdataset.tariterators import group_by_keys

from data_pipeline.decoders import decode_class
from data_pipeline.errors import BadInputError
from data_pipeline.masks import MASK_FIELDS
from data_pipeline.shards import check_shards_exist, resolve_shards, tar_members

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """An evaluation set in memory."""

    inputs: torch.Tensor
    """[N, C, S, S] images, [N, C, D, S, S] volumes or [N, C, T, S, S] clips, normalised."""
    labels: torch.Tensor
    """[N] int64 labels (-1 throughout for a set of masks without ``.cls``)."""
    keys: List[str]
    """Sample keys, in shard order."""
    skipped: int = 0
    """Samples that could not be decoded or had no label."""
    masks: Optional[torch.Tensor] = None
    """[N, S, S] (images, 2.5D slabs) or [N, D, S, S] (volumes) int64 class ids of each input's pixels (voxels) as
    its input views them; None: a set without masks."""


def _label(raw: dict, where: str) -> int:
    if "cls" not in raw:
        if any(field in raw for field in MASK_FIELDS):
            return -1
        raise BadInputError(where, "sample has no .cls label (nor a .seg.png / .seg.npy mask)")
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
    inputs, labels, keys, masks, skipped = [], [], [], [], 0
    for url in urls:
        try:
            for raw in group_by_keys(tar_members(url)):
                if len(inputs) >= max_samples:
                    break
                where = f"{url}:{raw['__key__']}"
                try:
                    label = _label(raw, where)
                    mask = preparer.evaluate_mask(raw) if any(f in raw for f in MASK_FIELDS) else None
                    inputs.append(preparer.evaluate(raw))
                except BadInputError as exc:
                    skipped += 1
                    log.warning("evaluation set: skipping %s", exc)
                    continue
                labels.append(label)
                keys.append(raw["__key__"])
                if mask is not None:
                    masks.append(mask)
        except BadInputError as exc:
            log.warning("evaluation set: %s", exc)
        if len(inputs) >= max_samples:
            break
    if not inputs:
        raise BadInputError(spec, "no labelled samples (input + .cls) in the evaluation shards")
    if labels.count(-1) not in (0, len(labels)) or len(masks) not in (0, len(labels)):
        raise BadInputError(spec, "some samples have a .cls label (or a mask) and some do not: all or none")
    return LabelledSet(torch.stack(inputs), torch.tensor(labels, dtype=torch.int64), keys, skipped,
                       torch.stack(masks) if masks else None)
