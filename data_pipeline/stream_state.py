"""Where a data stream stands: per-reader, per-source cursors, saved with every checkpoint.

A reader's stream of a source, pass after pass, is defined by the layout it was read in
(``readers`` readers in all, this one's index ``reader``): its shards (``split_by: shard``)
or its every-n-th sample (``split_by: sample``), shuffled from seeds of (pass, reader). A
:class:`Cursor` says how far a reader got.

Resuming with the same process and worker counts continues every reader exactly. With other
counts, :func:`rebalance` turns every old reader's unread rest of the current pass (and of
any later pass some reader had already started) into a *unit* (old layout, old reader,
pass, position, last pass), deals the units out to the new readers, and starts the new
layout at the pass after. Guarantee: no sample of those passes is read twice and none is
skipped; while the units last, the new readers' loads may differ by up to a reader's share
of a pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class Unit:
    """A rest of passes that an earlier layout left to one reader: old reader ``reader`` of ``readers``,
    from pass ``pass_index`` (``position`` raw samples of it already taken; counts up as the unit is
    read) through pass ``last_pass``."""

    readers: int
    reader: int
    pass_index: int
    position: int
    last_pass: int


@dataclass
class Cursor:
    """Where one reader stands in one source.

    ``pass_index``/``position``: the pass of its own layout and the raw samples taken in it.
    ``backlog``: :class:`Unit` s left by an earlier layout, read first (given as dicts, they
    become units).
    """

    pass_index: int = 0
    position: int = 0
    skipped: int = 0
    shard_errors: int = 0
    retries: int = 0
    """Transient remote-read errors retried (data_pipeline/retry.py)."""
    backlog: List[Unit] = field(default_factory=list)

    def __post_init__(self):
        self.backlog = [unit if isinstance(unit, Unit) else Unit(**unit) for unit in self.backlog]

    def stamp(self) -> dict:
        """A copy as a plain dict, units as dicts (what a batch carries and a checkpoint saves)."""
        return dict(vars(self), backlog=[dict(vars(unit)) for unit in self.backlog])


@dataclass
class ReaderState:
    """Where one reader stands: batches it has yielded and a cursor per source."""

    drawn: int = 0
    cursors: Dict[str, Cursor] = field(default_factory=dict)

    def cursor(self, source: str) -> Cursor:
        """The cursor of ``source`` (a fresh one for a source not read yet)."""
        return self.cursors.get(source, Cursor())


@dataclass
class StreamState:
    """Position of one process's data stream, saved with every checkpoint.

    A process reads with ``num_workers`` readers (at least 1); the DataLoader takes
    their batches round-robin, so ``batches`` tells which reader comes next, and each
    reader's :class:`ReaderState` tells how many batches it has yielded (the mixing schedule
    continues from there) and where it resumes in each source.
    """

    world_size: int = 1
    num_workers: int = 1
    batches: int = 0
    readers: Dict[int, ReaderState] = field(default_factory=dict)

    def advance(self, reader: int, position: dict) -> None:
        """Record that a batch from ``reader`` ending at ``position`` (its ``__cursor__`` stamp) was consumed."""
        state = self.readers.setdefault(reader, ReaderState())
        state.drawn = position["drawn"]
        state.cursors[position["source"]] = Cursor(**position["cursor"])  # a stamp: already the batch's own copy
        self.batches += 1

    def _all(self):
        return [c for r in self.readers.values() for c in r.cursors.values()]

    @property
    def skipped(self) -> int:
        """Undecodable samples skipped so far, over all readers and sources."""
        return sum(c.skipped for c in self._all())

    @property
    def shard_errors(self) -> int:
        """Unreadable or truncated shards met so far, over all readers and sources."""
        return sum(c.shard_errors for c in self._all())

    @property
    def retries(self) -> int:
        """Remote shard reads retried so far, over all readers and sources."""
        return sum(c.retries for c in self._all())

    def source_retries(self, name: str) -> int:
        """Remote shard reads of source ``name`` retried so far, over all readers."""
        return sum(r.cursors[name].retries for r in self.readers.values() if name in r.cursors)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        readers = {str(k): {"drawn": r.drawn, "cursors": {name: c.stamp() for name, c in r.cursors.items()}}
                   for k, r in self.readers.items()}
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batches": self.batches,
                "readers": readers}

    @classmethod
    def from_dict(cls, data: dict) -> "StreamState":
        """Inverse of :meth:`to_dict`."""
        readers = {int(k): ReaderState(r["drawn"], {name: Cursor(**copy.deepcopy(c))
                                                    for name, c in r["cursors"].items()})
                   for k, r in data.get("readers", {}).items()}
        return cls(data["world_size"], data["num_workers"], data["batches"], readers)

    def matches(self, world_size: int, num_workers: int) -> bool:
        """Whether this state was saved with these process and worker counts (then it resumes as it is)."""
        return (self.world_size, self.num_workers) == (world_size, max(1, num_workers))


def rebalance(saved: List[StreamState], world_size: int, num_workers: int, rank: int) -> StreamState:
    """This process's stream state in a new layout, from the states every old process saved.

    Args:
        saved: the old processes' states, in rank order (all of them).
        world_size, num_workers, rank: the new layout and this process.

    Returns:
        A state whose readers first read the units dealt to them (unit ``k`` of the sorted list to
        new global reader ``k mod readers``), then the new layout from the pass after the last
        pass any old reader had started. Skip, shard-error and retry counts move to reader 0 of rank 0.
    """
    old_workers = saved[0].num_workers
    old_readers = len(saved) * old_workers
    workers = max(1, num_workers)
    readers = world_size * workers
    sources = sorted({name for state in saved for r in state.readers.values() for name in r.cursors})
    fresh = {logical: ReaderState(drawn=saved[0].batches // workers) for logical in range(workers)}
    for name in sources:
        old = [(p * old_workers + logical, state.readers.get(logical, ReaderState()).cursor(name))
               for p, state in enumerate(saved) for logical in range(old_workers)]
        last_pass = max(cursor.pass_index for _, cursor in old)
        units = []
        for reader, cursor in old:
            units.extend(copy.deepcopy(cursor.backlog))
            units.append(Unit(old_readers, reader, cursor.pass_index, cursor.position, last_pass))
        for logical in range(workers):
            mine = [u for k, u in enumerate(units) if k % readers == rank * workers + logical]
            fresh[logical].cursors[name] = Cursor(pass_index=last_pass + 1, backlog=mine)
        if rank == 0:
            fresh[0].cursors[name].skipped = sum(c.skipped for _, c in old)
            fresh[0].cursors[name].shard_errors = sum(c.shard_errors for _, c in old)
            fresh[0].cursors[name].retries = sum(c.retries for _, c in old)
    return StreamState(world_size, workers, 0, fresh)
