"""``write_<kind>_shards(src, out, samples_per_shard, progress, ...)``: one conversion of a shard kind from Python.

Each is :func:`data_pipeline.conversion.convert` for its kind, in this process by default (``workers=1``;
the command line uses every core). Options of the kind are keyword arguments: ``labels`` for every kind (a
CSV of ``path,label`` rows: a labelled set), ``masks`` for ``xray`` and ``tiles`` (a folder of class-id PNGs: a
segmentation set, :mod:`data_pipeline.masks`), ``mpp`` / ``tile_size`` / ``min_tissue`` / ``source_mpp`` for
``wsi``, ``max_side`` for ``video`` and ``xray``, ``encoding`` / ``quality`` for ``xray``, ``tiles`` and ``wsi``
(:mod:`data_pipeline.encodings`); ``sources_per_part`` and ``fresh`` as in ``convert``. What the samples
hold is told by each kind's module: :mod:`data_pipeline.write_shards` (X-rays, pre-cut tiles),
:mod:`data_pipeline.ct_io`, :mod:`data_pipeline.wsi_io`, :mod:`data_pipeline.video_io`.
"""
from __future__ import annotations

from typing import Callable, Optional

from data_pipeline.conversion import convert
from data_pipeline.kinds import KINDS


def writer(kind: str) -> Callable[..., dict]:
    """The ``write_<kind>_shards`` function of a kind of :data:`data_pipeline.kinds.KINDS`."""

    def write(src: str, out: str, samples_per_shard: Optional[int] = None, progress: bool = True,
              workers: int = 1, **options) -> dict:
        return convert(kind, src, out, samples_per_shard, workers=workers, progress=progress, **options)

    write.__name__ = write.__qualname__ = f"write_{kind}_shards"
    write.__doc__ = (f"Convert every {kind} source under ``src`` into ``{KINDS[kind].modality}-NNNNNN.tar`` shards "
                     "and ``manifest.json`` in ``out`` (see the module); returns the manifest.")
    return write


WRITERS = {kind: writer(kind) for kind in KINDS}
"""kind -> its ``write_<kind>_shards``."""

write_xray_shards = WRITERS["xray"]
write_tile_shards = WRITERS["tiles"]
write_ct_shards = WRITERS["ct"]
write_wsi_shards = WRITERS["wsi"]
write_video_shards = WRITERS["video"]
