"""The streaming pipeline of one training process: readers -> mixed, stamped batches -> the DataLoader.

Each process runs ``max(1, num_workers)`` readers. A reader reads every source through the
stages of :mod:`data_pipeline.stream` (shards of the pass, tar samples, shuffle, split,
cursor, replay, prepare, batches), draws the source of each of its batches from the mixing
schedule, and stamps each batch with its cursor; resuming replays a reader's current pass
up to its cursor without preparing a sample, so a resumed run neither repeats nor skips one.

Bad input never stops the stream by default (``data.on_error=skip``): an undecodable sample is
skipped, a truncated or unreadable shard ends that shard; both are counted in the cursor and logged. A
transient error on a remote shard (a reset, a timeout, a 5xx or SlowDown) is retried first (``data.retry``).
"""
from __future__ import annotations

import functools
import itertools
import logging
import signal
from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from data_pipeline.batch_memory import BatchBuffers, ReleasingLoader
from data_pipeline.device_decode import ENCODED, DeviceDecode, decode_device, pack
from data_pipeline.errors import BadInputError
from data_pipeline.mixture import Source, WeightedSchedule, source_spec
from data_pipeline.modalities import build_preparer
from data_pipeline.retry import RetryPolicy
from data_pipeline.shards import ShardList, check_shards_exist, resolve_shards
from data_pipeline.stream import HANDLERS, Reading, SourceReader
from data_pipeline.stream_state import Cursor, ReaderState, StreamState

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Infinite stream of batches for one training process, mixing one or more sources.

    Args:
        sources: the :class:`data_pipeline.mixture.Source` list (shard URLs, preparer, weight).
        batch_size: samples per batch.
        seed: run seed.
        rank, world_size: this process and the process count.
        num_workers: DataLoader workers (0 = read in this process).
        shuffle_buffer_size: shuffle buffer (0 = none).
        shuffle_shards: reshuffle shard order each pass.
        split_by: 'shard' or 'sample'.
        state: a saved StreamState to resume from.
        reuse_batch_memory: workers collate into reused shared buffers (data_pipeline/batch_memory.py).
        on_error: the error policy (:data:`data_pipeline.stream.HANDLERS`: skip or raise).
        retry: how transient errors on remote shards are retried (default: :class:`RetryPolicy`'s).
    """

    def __init__(self, sources: List[Source], batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer_size: int, shuffle_shards: bool, split_by: str,
                 state: Optional[StreamState] = None, reuse_batch_memory: bool = True, on_error: str = "skip",
                 retry: Optional[RetryPolicy] = None):
        if on_error not in HANDLERS:
            raise ValueError(f"data.on_error={on_error!r} is not one of {sorted(HANDLERS)}")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.rank = rank
        self.readers_per_process = max(1, num_workers)
        self.num_readers = world_size * self.readers_per_process
        self.reading = Reading(seed, self.num_readers, split_by, shuffle_shards, shuffle_buffer_size, HANDLERS[on_error],
                               retry or RetryPolicy())
        self.state = state or StreamState(world_size, self.readers_per_process)
        self.buffers = BatchBuffers(num_workers, len(self.sources)) if num_workers and reuse_batch_memory else None
        if not self.state.matches(world_size, num_workers):
            raise ValueError(f"a stream state saved with {self.state.world_size} process(es) x {self.state.num_workers} "
                             f"reader(s) for {world_size} x {self.readers_per_process}: rebalance it first "
                             "(data_pipeline.stream_state.rebalance)")
        for source in self.sources:
            if split_by == "shard" and len(source.urls) < self.num_readers:
                raise BadInputError(
                    ",".join(source.urls[:3]) + ("..." if len(source.urls) > 3 else ""),
                    f"source {source.name!r}: {len(source.urls)} shard(s) for {self.num_readers} readers "
                    f"({world_size} process(es) x {self.readers_per_process} worker(s)); write more shards or set "
                    "data.split_by=sample",
                )

    def reader_batches(self, logical: int, worker: Optional[int] = None) -> Iterator[dict]:
        """Endless batches of one reader (``logical`` in 0..readers_per_process-1), from its saved place on;
        in DataLoader worker ``worker`` they are collated into its reused buffers where any is free.

        The schedule names the source of the reader's ``k``-th batch. Each reader follows the whole
        schedule (so it reads every source in proportion and its share of each source advances
        evenly); its ``k``-th batch is process batch ``k * readers + logical`` (the DataLoader
        takes readers round-robin) on every rank, so all ranks train on the same source at a step.
        """
        reader = self.rank * self.readers_per_process + logical
        saved = self.state.readers.get(logical, ReaderState())
        schedule = WeightedSchedule([source.weight for source in self.sources])
        readers, streams = {}, {}
        for index, source in enumerate(self.sources):
            take = None
            if self.buffers is not None and worker is not None:
                take = functools.partial(self.buffers.take, worker, index, self.batch_size)
            readers[source.name] = SourceReader(self.reading, source, reader, Cursor(**saved.cursor(source.name).stamp()))
            streams[source.name] = readers[source.name].batches(self.batch_size, take)
        for drawn in itertools.count(saved.drawn):
            source = self.sources[schedule.source_at(drawn)]
            samples, slot = next(streams[source.name])
            cursor = readers[source.name].cursor
            yield collate(samples, logical, {"drawn": drawn + 1, "source": source.name, "cursor": cursor.stamp()},
                          source, slot)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else None
        rotation = self.state.batches % self.readers_per_process
        return self.reader_batches(((worker or 0) + rotation) % self.readers_per_process, worker)


def collate(samples: List[dict], reader: int, position: dict, source: Source, slot=None) -> dict:
    """Stack samples into a batch and stamp it with its source, the reader and the reader's position.

    Every tensor field of the samples (the views) is stacked along a new first dimension: with
    ``slot`` (a worker's reused buffers, :class:`data_pipeline.batch_memory.Slot`) the samples are
    already in its rows; without, torch's ``default_collate`` stacks them, in a DataLoader worker
    straight into fresh shared memory. On the device path the samples' encoded images and choices are
    packed into one :class:`~data_pipeline.device_decode.EncodedBatch` (made views in the training process).
    The seeds stay a list here (every tensor a worker sends costs a file-descriptor hand-over); the
    ``ReleasingLoader`` makes them a tensor.
    """
    if slot is not None:
        tensors = slot.finish()
    else:
        tensors = {name: default_collate([s[name] for s in samples]) for name, value in samples[0].items()
                   if torch.is_tensor(value)}
    if ENCODED in samples[0]:  # the device path: encoded images and drawn choices, packed
        tensors[ENCODED] = pack([s[ENCODED] for s in samples])
    return {
        **tensors,
        "seed": [s["seed"] for s in samples],
        "key": [s["key"] for s in samples],
        "url": [s["url"] for s in samples],
        "index": [s["index"] for s in samples],
        "source": source.name,
        "modality": source.modality,
        "stem": source.stem,
        "__reader__": reader,
        "__cursor__": position,
    }


def ignore_warning_signals(worker_id: int, names: tuple = ("USR1", "USR2")) -> None:
    """DataLoader worker start-up: ignore the signals a scheduler sends before preemption (USR1/USR2, and
    the run's stop signal, TERM where SLURM preempts without a user signal), which reach every process
    of a task: the training process handles them, and a worker they killed would fail the step before
    its checkpoint."""
    for name in names:
        signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_IGN)


def build_loader(data_cfg, spec, seed: int, rank: int, world_size: int,
                 state: Optional[StreamState] = None, stems: Optional[dict] = None, stop_signal: str = "USR1",
                 decode_on: Optional[str] = None) -> tuple:
    """Start-up checks (shards exist, each source can feed the objective) and the DataLoader over a ShardStream.

    With ``data.decode_device=cuda`` (and a GPU) the pathology sources take the device path
    (:mod:`data_pipeline.device_decode`): workers draw, the training process decodes and makes the views
    on the GPU. ``decode_on`` names that device instead of the setting (a benchmark or test runs the
    device path with ``cpu``).

    Returns:
        (loader, stream, shards): iterate the loader (a :class:`ReleasingLoader` over the DataLoader,
        which hands workers' batch buffers back); the stream's ``state`` is what to advance and
        save; ``shards`` is the ShardList of all sources together. ``stems`` (model.stems) gives the
        channels of the sources that go through an extra stem (``source.stem``).
    """
    sources, shards = [], ShardList(urls=[])
    if not data_cfg.sources:
        raise ValueError("data.sources is empty: a DataConfig made by hand needs resolve_sources() "
                         "(load_config does it)")
    device = decode_on if decode_on is not None else decode_device(data_cfg.decode_device)
    views = {}
    for cfg in data_cfg.sources:
        found = resolve_shards(cfg.shards)
        check_shards_exist(found.urls, RetryPolicy(**vars(data_cfg.retry)))
        encoded = device is not None and cfg.modality == "pathology"
        prepare = build_preparer(cfg, source_spec(spec, cfg, dict(stems or {})), encoded)
        if encoded:
            views[cfg.name] = prepare.view
        sources.append(Source(cfg.name, found.urls, prepare, cfg.weight, cfg.modality, cfg.stem))
        shards.urls.extend(found.urls)
        shards.manifest_samples += found.manifest_samples
        shards.skipped_files += found.skipped_files
    stream = ShardStream(sources, data_cfg.batch_size, seed, rank, world_size, data_cfg.num_workers,
                         data_cfg.shuffle_buffer, data_cfg.shuffle_shards, data_cfg.split_by, state,
                         data_cfg.reuse_batch_memory, data_cfg.on_error, RetryPolicy(**vars(data_cfg.retry)))
    quiet = functools.partial(ignore_warning_signals, names=("USR1", "USR2", stop_signal))
    loader = DataLoader(stream, batch_size=None, num_workers=data_cfg.num_workers,
                        persistent_workers=data_cfg.num_workers > 0, worker_init_fn=quiet)
    pin = data_cfg.pin_memory and stream.buffers is not None and torch.cuda.is_available()
    decode = DeviceDecode(views, device) if views else None
    return ReleasingLoader(loader, stream.buffers, pin=pin, decode=decode), stream, shards
