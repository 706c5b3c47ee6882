"""The stream as stages: each an iterator -> iterator callable, composed for every unit of reading.

One reader's samples of one source pass through, in order::

    shards of the pass -> tar members grouped into samples (indexed in their shard) -> shuffle buffer
    -> split by sample -> counted (the cursor's position) -> replay-skip -> prepare (views) -> batches

A *unit* is one pass of one layout (``readers`` readers, this one ``reader``): a pass of the
reader's own layout, or a rest of a pass that an earlier layout left (a backlog
:class:`~data_pipeline.stream_state.Unit`). The counting stage moves the unit's position with
every raw sample taken, so a batch stamped with the cursor says exactly where it ends;
resuming replays a unit up to its position without preparing a sample.

What goes wrong (an undecodable sample, a truncated or unreadable shard, a sample that does
not fit its batch) goes to a *handler*: :func:`skip_and_count` (the default: log, count in
the cursor, go on) or :func:`raise_errors` (``data.on_error=raise``: checking a dataset, tests);
``pretrain shards inspect`` passes one that lists every error. An error met while replaying was
already counted before the checkpoint, and is not counted again. A transient error on a remote
shard never reaches the handler until its retries are spent (:mod:`data_pipeline.retry`): the tar
stage reopens the shard and reads on where it stopped, so the stages after it see an undisturbed read.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional

from webdataset.tariterators import group_by_keys

from data_pipeline.errors import BadInputError
from data_pipeline.retry import RetryPolicy, is_remote, transient
from data_pipeline.shards import tar_members

log = logging.getLogger(__name__)

Stage = Callable[[Iterator], Iterator]


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes and runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def compose(items: Iterable, *stages: Stage) -> Iterator:
    """``items`` through every stage in turn."""
    stream = iter(items)
    for stage in stages:
        stream = stage(stream)
    return stream


@dataclass
class StreamError:
    """One thing that went wrong in a reader's stream, as the handler sees it."""

    kind: str
    """'sample' (skipped: counted in ``cursor.skipped``) or 'shard' (the rest of a shard: ``cursor.shard_errors``)."""
    where: str
    error: Exception
    cursor: object
    """The :class:`~data_pipeline.stream_state.Cursor` of the reader and source."""
    replayed: bool = False
    """Met while replaying: the run met (and counted) it before its checkpoint."""


def skip_and_count(event: StreamError) -> None:
    """The default policy: log, count in the cursor, go on (a long run never dies on one bad sample)."""
    if event.replayed:
        return
    if event.kind == "shard":
        event.cursor.shard_errors += 1
        log.warning("skipping the rest of shard %s: %s", event.where, event.error)
    else:
        event.cursor.skipped += 1
        log.warning("skipping sample %s: %s", event.where, event.error)


def raise_errors(event: StreamError) -> None:
    """The strict policy: the first error stops the stream, naming the file."""
    raise BadInputError(event.where, f"{event.kind}: {event.error}") from event.error


HANDLERS = {"skip": skip_and_count, "raise": raise_errors}
"""Error policies by name (``data.on_error``)."""


class Report:
    """The handler bound to one reader's cursor (and the replay of the unit being read, if any)."""

    def __init__(self, handler: Callable[[StreamError], None], cursor, replay: Optional["Replay"] = None):
        self.handler, self.cursor, self.replay = handler, cursor, replay

    def __call__(self, kind: str, where: str, error: Exception) -> None:
        replayed = self.replay is not None and self.replay.left > 0
        self.handler(StreamError(kind, where, error, self.cursor, replayed))

    def retried(self, where: str, error: Exception, attempt: int, delay: float) -> None:
        """A transient error on a remote shard that is retried: logged and counted in the cursor (a new
        event even while replaying: it is this run's network, not the data, that failed)."""
        if self.cursor is not None:
            self.cursor.retries += 1
        log.warning("retry %d for shard %s in %.1f s: %s", attempt, where, delay, error)


def pass_shards(urls: List[str], shuffle_seed: Optional[int], reader: int, readers: int, by_shard: bool) -> List[str]:
    """The shards of one pass for reader ``reader`` of ``readers``: all of them in an order shuffled from
    ``shuffle_seed`` (None: as listed), every ``readers``-th from ``reader`` when split by shard."""
    shards = list(urls)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(shards)
    return shards[reader::readers] if by_shard else shards


def tar_samples(report: Report, retry: Optional[RetryPolicy] = None) -> Stage:
    """Stage: shard URLs -> raw samples (webdataset's grouping of tar members by key), each with
    ``__index__``, its place in its shard (what lineage records). A shard that fails ends there, unless
    it is remote and the error transient (:mod:`data_pipeline.retry`): then, while ``retry`` allows, the
    shard is reopened after a backoff and read on from the first sample not yet passed on."""
    jitter = random.Random()  # backoff jitter only: what is read never depends on it

    def shard(url: str) -> Iterator[dict]:
        done, attempt = 0, 0
        while True:
            try:
                for index, sample in enumerate(group_by_keys(tar_members(url))):
                    if index >= done:
                        sample["__index__"], done, attempt = index, index + 1, 0
                        yield sample
                return
            except Exception as exc:  # a truncated or unreadable shard ends that shard only
                delay = retry.delay(attempt, jitter) if retry and is_remote(url) and transient(exc) else None
                if delay is None:
                    report("shard", url, exc)
                    return
                attempt += 1
                report.retried(url, exc, attempt, delay)
                time.sleep(delay)

    def stage(urls: Iterator[str]) -> Iterator[dict]:
        for url in urls:
            yield from shard(url)

    return stage


def shuffled(size: int, rng: random.Random) -> Stage:
    """Stage: a reservoir-style shuffle holding ``size`` samples (emit a random one per new sample, then drain)."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
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

    return stage


def every_nth(start: int, step: int) -> Stage:
    """Stage: the split by sample, every ``step``-th sample from ``start``."""
    return lambda samples: itertools.islice(samples, start, None, step)


def counted(place) -> Stage:
    """Stage: adds one to ``place.position`` (a cursor or a backlog unit) for every raw sample it passes on."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            place.position += 1
            yield sample

    return stage


class Replay:
    """Stage: passes over the first ``left`` raw samples (taken before the checkpoint), undecoded."""

    def __init__(self, left: int):
        self.left = left

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            if self.left:
                self.left -= 1
                continue
            yield sample


def where_of(sample: dict) -> str:
    """'url:key' of a raw or prepared sample, for messages."""
    return f"{sample.get('__url__', sample.get('url'))}:{sample.get('__key__', sample.get('key'))}"


def prepared(prepare: Callable, seed_of: Callable[[str], int], report: Report) -> Stage:
    """Stage: raw samples -> the objective's views (``prepare(raw, seed)``: tensors, seed, key) plus the
    sample's ``url`` and ``index``; a sample that fails is reported (skipped by default)."""

    def stage(raws: Iterator[dict]) -> Iterator[dict]:
        for raw in raws:
            try:
                sample = prepare(raw, seed_of(raw["__key__"]))
            except Exception as exc:  # one bad sample never stops the run
                report("sample", where_of(raw), exc)
                continue
            yield dict(sample, url=raw["__url__"], index=raw["__index__"])

    return stage


def batches(size: int, report: Report, take: Optional[Callable] = None) -> Stage:
    """Stage: samples -> ``(samples, slot)`` per ``size`` of them. ``take`` (in a DataLoader worker) gives a
    free slot of reused batch buffers at each batch's first sample, or None; with a slot every sample's
    tensors are copied into its row as it arrives (while they are still in cache) and ``samples`` keep
    only their other fields. A sample that does not fit the batch's rows is reported."""

    def stage(samples: Iterator[dict]) -> Iterator[tuple]:
        rows: List[dict] = []
        slot = None
        for sample in samples:
            if take is not None and not rows:
                slot = take()
            if slot is not None:
                try:
                    sample = slot.put(len(rows), sample)
                except ValueError as exc:
                    report("sample", where_of(sample), exc)
                    continue
            rows.append(sample)
            if len(rows) == size:
                yield rows, slot
                rows, slot = [], None

    return stage


@dataclass
class Reading:
    """How every reader of a stream reads: the run seed, the layout's reader count, the split and shuffles."""

    seed: int
    readers: int
    split_by: str
    shuffle_shards: bool
    shuffle_buffer: int
    handler: Callable[[StreamError], None] = skip_and_count
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class SourceReader:
    """One reader's endless prepared samples of one source, from its cursor on.

    It reads the units of its backlog first (rests of passes of an earlier layout), then its own
    layout pass after pass, each unit through :meth:`unit_stages`. ``samples`` is the stream.

    Raises (while iterating):
        BadInputError: a whole pass of its own layout gave no readable sample.
    """

    def __init__(self, reading: Reading, source, reader: int, cursor):
        self.reading, self.source, self.reader, self.cursor = reading, source, reader, cursor
        self.report = Report(reading.handler, cursor)

    def samples(self) -> Iterator[dict]:
        """The prepared samples (see :func:`prepared`), endless."""
        cursor = self.cursor
        while cursor.backlog:
            unit = cursor.backlog[0]
            skip, unit.position = unit.position, 0
            yield from self.unit(unit.pass_index, unit.reader, unit.readers, unit, skip)
            if unit.pass_index < unit.last_pass:
                unit.pass_index, unit.position = unit.pass_index + 1, 0
            else:
                cursor.backlog.pop(0)
        resume_pass, resume_position = cursor.pass_index, cursor.position
        for pass_index in itertools.count(resume_pass):
            skip = resume_position if pass_index == resume_pass else 0
            cursor.pass_index, cursor.position = pass_index, 0
            produced = yield from self.unit(pass_index, self.reader, self.reading.readers, cursor, skip)
            if not produced and not skip:
                raise BadInputError(f"reader {self.reader}", f"no readable samples in a whole pass over source "
                                                             f"{self.source.name!r}: {self.source.urls}")

    def unit(self, pass_index: int, reader: int, readers: int, place, skip: int) -> Iterator[dict]:
        """One unit's prepared samples (``place``: the cursor or backlog unit its position counts in, from 0;
        ``skip``: raw samples to replay); returns how many it produced."""
        replay = Replay(skip)
        report = Report(self.reading.handler, self.cursor, replay)
        name, by_shard = self.source.name, self.reading.split_by == "shard"
        shuffle_seed = stable_seed(self.reading.seed, "shards", name, pass_index) if self.reading.shuffle_shards else None
        urls = pass_shards(self.source.urls, shuffle_seed, reader, readers, by_shard)
        produced = 0
        for sample in compose(urls, *self.unit_stages(pass_index, reader, readers, place, replay, report)):
            produced += 1
            yield sample
        return produced

    def unit_stages(self, pass_index: int, reader: int, readers: int, place, replay: Replay,
                    report: Report) -> List[Stage]:
        """The stages from a unit's shard URLs to its prepared samples."""
        reading, name = self.reading, self.source.name
        stages = [tar_samples(report, reading.retry)]
        if reading.shuffle_buffer:
            owner = reader if reading.split_by == "shard" else "all"  # split by sample: all readers shuffle alike
            stages.append(shuffled(reading.shuffle_buffer,
                                   random.Random(stable_seed(reading.seed, "buffer", name, pass_index, owner))))
        if reading.split_by == "sample":
            stages.append(every_nth(reader, readers))
        seed_of = functools.partial(stable_seed, reading.seed, pass_index)  # the sample's seed, from its key
        return stages + [counted(place), replay, prepared(self.source.prepare, seed_of, report)]

    def batches(self, size: int, take: Optional[Callable] = None) -> Iterator[tuple]:
        """Endless ``(samples, slot)`` batches of ``size`` (see :func:`batches`)."""
        return batches(size, self.report, take)(self.samples())
