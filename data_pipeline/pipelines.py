"""The streaming pipeline: shard list -> readers -> tar samples -> shuffle -> decode -> views -> batches.

Each process runs ``max(1, num_workers)`` readers. A reader walks the shards pass after
pass (shard order reshuffled each pass from the run seed), splits them by shard or by
sample across all readers of all processes, shuffles with a seeded buffer, decodes,
augments with a per-sample generator, and yields full batches stamped with its cursor.
Resuming replays a reader's current pass up to its cursor without decoding, so a
resumed run neither repeats nor skips samples.

Bad input never stops the stream: an undecodable sample is skipped, a truncated or
unreadable shard ends that shard; both are counted in the cursor and logged.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import random
import signal
from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys

from data_pipeline.batch_memory import BatchBuffers, ReleasingLoader
from data_pipeline.errors import BadInputError
from data_pipeline.mixture import Source, WeightedSchedule, source_configs, source_spec
from data_pipeline.modalities import build_decoder
from data_pipeline.shards import ShardList, check_shards_exist, resolve_shards, tar_members
from data_pipeline.stream_state import Cursor, ReaderState, StreamState

log = logging.getLogger(__name__)


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes and runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle: hold ``size`` samples, emit a random one per new sample, then drain."""
    held: List[dict] = []
    for sample in samples:
        if len(held) < size:
            held.append(sample)
            continue
        index = rng.randrange(len(held))
        held[index], sample = sample, held[index]
        yield sample
    rng.shuffle(held)
    yield from held


class ShardStream(IterableDataset):
    """Infinite stream of batches for one training process, mixing one or more sources.

    Args:
        sources: the :class:`data_pipeline.mixture.Source` list (shard URLs, decoder, weight).
        batch_size: samples per batch.
        seed: run seed.
        rank, world_size: this process and the process count.
        num_workers: DataLoader workers (0 = read in this process).
        shuffle_buffer_size: shuffle buffer (0 = none).
        shuffle_shards: reshuffle shard order each pass.
        split_by: 'shard' or 'sample'.
        state: a saved StreamState to resume from.
        reuse_batch_memory: workers write batches into reused shared buffers (data_pipeline/batch_memory.py).
    """

    def __init__(self, sources: List[Source], batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer_size: int, shuffle_shards: bool, split_by: str,
                 state: Optional[StreamState] = None, reuse_batch_memory: bool = True):
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.readers_per_process = max(1, num_workers)
        self.num_readers = world_size * self.readers_per_process
        self.shuffle_buffer_size = shuffle_buffer_size
        self.shuffle_shards = shuffle_shards
        self.split_by = split_by
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

    def _raw_pass(self, source: Source, pass_index: int, reader: int, readers: int, on_shard_error) -> Iterator[dict]:
        """The raw samples of one pass of ``source`` for reader ``reader`` of a layout of ``readers`` readers."""
        shards = list(source.urls)
        if self.shuffle_shards:
            random.Random(stable_seed(self.seed, "shards", source.name, pass_index)).shuffle(shards)
        if self.split_by == "shard":
            shards = shards[reader::readers]

        def samples() -> Iterator[dict]:
            for url in shards:
                try:
                    for index, sample in enumerate(group_by_keys(tar_members(url))):
                        sample["__index__"] = index  # its place in the shard: what lineage records
                        yield sample
                except Exception as exc:  # a truncated or unreadable shard ends that shard only
                    on_shard_error(url, exc)

        stream: Iterator[dict] = samples()
        if self.shuffle_buffer_size:
            buffer_owner = reader if self.split_by == "shard" else "all"
            rng = random.Random(stable_seed(self.seed, "buffer", source.name, pass_index, buffer_owner))
            stream = shuffle_buffer(stream, self.shuffle_buffer_size, rng)
        if self.split_by == "sample":
            stream = itertools.islice(stream, reader, None, readers)
        return stream

    def source_batches(self, source: Source, reader: int, cursor: Cursor, take=None) -> Iterator[tuple]:
        """Endless ``(samples, cursor, slot)`` batches of one source for one reader, from ``cursor`` on.

        The reader first reads the units of its backlog (rests of passes of an earlier layout),
        then its own layout pass after pass. Resuming passes over the samples already taken in
        the current unit or pass without decoding them. ``take`` (in a worker: a free slot of
        reused batch buffers, or None) is asked at each batch's first sample; with a slot, the
        decoder writes every sample's views into its rows, and ``slot`` comes with the batch.
        """
        batch: List[dict] = []
        replay = {"left": 0}  # raw samples still to pass over undecoded
        slot = None  # the reused buffers of the batch being read

        def on_shard_error(url: str, exc: Exception) -> None:
            if not replay["left"]:
                cursor.shard_errors += 1
                log.warning("skipping the rest of shard %s: %s", url, exc)

        def read(raws: Iterator[dict], pass_index: int, step) -> Iterator[tuple]:
            """Decode ``raws`` into batches, calling ``step()`` per raw sample; returns samples produced."""
            nonlocal batch, slot
            produced = 0
            for raw in raws:
                step()
                if replay["left"]:
                    replay["left"] -= 1
                    continue
                try:
                    if take is not None and slot is None and not batch:
                        slot = take()
                    rows = slot.rows(len(batch)) if slot is not None else None
                    sample = source.decoder(raw, stable_seed(self.seed, pass_index, raw["__key__"]), rows)
                    if slot is not None:
                        sample = slot.put(len(batch), sample)
                    batch.append(dict(sample, url=raw["__url__"], index=raw["__index__"]))
                except Exception as exc:  # one bad sample never stops the run
                    cursor.skipped += 1
                    log.warning("skipping sample %s:%s: %s", raw.get("__url__"), raw.get("__key__"), exc)
                    continue
                produced += 1
                if len(batch) == self.batch_size:
                    yield batch, cursor, slot
                    batch, slot = [], None
            return produced

        while cursor.backlog:
            unit = cursor.backlog[0]
            replay["left"], unit["position"] = unit["position"], 0
            raws = self._raw_pass(source, unit["pass_index"], unit["reader"], unit["readers"], on_shard_error)
            yield from read(raws, unit["pass_index"], lambda: unit.__setitem__("position", unit["position"] + 1))
            if unit["pass_index"] < unit["last_pass"]:
                unit["pass_index"], unit["position"] = unit["pass_index"] + 1, 0
            else:
                cursor.backlog.pop(0)
        resume_pass, resume_position = cursor.pass_index, cursor.position
        for pass_index in itertools.count(resume_pass):
            replay["left"] = resume_position if pass_index == resume_pass else 0
            cursor.pass_index, cursor.position = pass_index, 0
            raws = self._raw_pass(source, pass_index, reader, self.num_readers, on_shard_error)
            produced = yield from read(raws, pass_index, lambda: setattr(cursor, "position", cursor.position + 1))
            if produced == 0 and not (pass_index == resume_pass and resume_position):
                raise BadInputError(f"reader {reader}",
                                    f"no readable samples in a whole pass over source {source.name!r}: {source.urls}")

    def reader_batches(self, logical: int, worker: Optional[int] = None) -> Iterator[dict]:
        """Endless batches of one reader (``logical`` in 0..readers_per_process-1), from its saved place on;
        in DataLoader worker ``worker`` they are written into its reused buffers where any is free.

        The schedule names the source of the reader's ``k``-th batch. Each reader follows the whole
        schedule (so it reads every source in proportion and its share of each source advances
        evenly); its ``k``-th batch is process batch ``k * readers + logical`` (the DataLoader
        takes readers round-robin) on every rank, so all ranks train on the same source at a step.
        """
        reader = self.rank * self.readers_per_process + logical
        saved = self.state.readers.get(logical, ReaderState())
        schedule = WeightedSchedule([source.weight for source in self.sources])
        streams = {}
        for index, source in enumerate(self.sources):
            take = None
            if self.buffers is not None and worker is not None:
                take = functools.partial(self.buffers.take, worker, index, self.batch_size)
            streams[source.name] = self.source_batches(source, reader, Cursor(**saved.cursor(source.name).stamp()),
                                                       take)
        for drawn in itertools.count(saved.drawn):
            source = self.sources[schedule.source_at(drawn)]
            samples, cursor, slot = next(streams[source.name])
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
    straight into fresh shared memory. The seeds stay a list here (every tensor a worker sends
    costs a file-descriptor hand-over); the ``ReleasingLoader`` makes them a tensor.
    """
    if slot is not None:
        tensors = slot.finish()
    else:
        tensors = {name: default_collate([s[name] for s in samples]) for name, value in samples[0].items()
                   if torch.is_tensor(value)}
    return {
        **tensors,
        "seed": [s["seed"] for s in samples],
        "key": [s["key"] for s in samples],
        "url": [s["url"] for s in samples],
        "index": [s["index"] for s in samples],
        "source": source.name,
        "modality": source.modality,
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
                 state: Optional[StreamState] = None, stems: Optional[dict] = None, stop_signal: str = "USR1") -> tuple:
    """Start-up checks (shards exist, each source can feed the objective) and the DataLoader over a ShardStream.

    Returns:
        (loader, stream, shards): iterate the loader (a :class:`ReleasingLoader` over the DataLoader,
        which hands workers' batch buffers back); the stream's ``state`` is what to advance and
        save; ``shards`` is the ShardList of all sources together. ``stems`` (model.stems) gives the
        channels of sources whose modality is not ``data.modality``.
    """
    sources, shards = [], ShardList(urls=[])
    for cfg in source_configs(data_cfg):
        found = resolve_shards(cfg.shards)
        check_shards_exist(found.urls)
        decoder = build_decoder(cfg, source_spec(spec, cfg, dict(stems or {}), data_cfg.modality))
        sources.append(Source(cfg.name, found.urls, decoder, cfg.weight, cfg.modality))
        shards.urls.extend(found.urls)
        shards.manifest_samples += found.manifest_samples
        shards.skipped_files += found.skipped_files
    stream = ShardStream(sources, data_cfg.batch_size, seed, rank, world_size, data_cfg.num_workers,
                         data_cfg.shuffle_buffer, data_cfg.shuffle_shards, data_cfg.split_by, state,
                         data_cfg.reuse_batch_memory)
    quiet = functools.partial(ignore_warning_signals, names=("USR1", "USR2", stop_signal))
    loader = DataLoader(stream, batch_size=None, num_workers=data_cfg.num_workers,
                        persistent_workers=data_cfg.num_workers > 0, worker_init_fn=quiet)
    pin = data_cfg.pin_memory and stream.buffers is not None and torch.cuda.is_available()
    return ReleasingLoader(loader, stream.buffers, pin=pin), stream, shards
