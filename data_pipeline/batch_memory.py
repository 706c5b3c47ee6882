"""Shared-memory batch buffers that DataLoader workers reuse once the training process lets go of them.

A worker's batch reaches the training process through shared memory. Torch's collate in a
worker allocates a fresh shared-memory file per batch, whose every page the kernel then
allocates, zeroes and maps; the training process receives a file descriptor (a socket
hand-over with an authentication challenge) and maps it again, page by page as it reads.
On the 2-core development machine the worker's part alone costs 0.42 ms per 224 px RGB
float32 sample (stacking into memory already mapped costs 0.09 ms), a fifth of a pathology
tile's decode time.

So each worker keeps ``slots`` buffers per source in shared memory and writes a batch into
a free one. Which buffers are free is written on a board, a small shared tensor
``[workers, sources, slots]`` that the training process and every worker see:

* a worker takes a slot whose entry is 0 when it starts a batch, writes a fresh token into
  the entry, copies each sample into its row as soon as it is prepared (the stream's batching
  stage, while the views are still in cache; views themselves know nothing of batches) and sends the batch marked ``(worker, source, slot, token,
  generation)``. The buffers themselves travel only the first time after they are
  (re)allocated (a new generation); after that the mark is enough, because the training
  process keeps its mapping of every slot it has received;
* the training process (:class:`ReleasingLoader`) hands the consumer an alias of each buffer
  (the same memory under a storage of its own) and keeps a weak reference to it; once every
  alias of a batch has expired (no tensor, view or array in the process uses that memory any
  more) it writes 0 back, but only over its own token.

Only the worker turns 0 into a token and only the training process turns its token back
into 0, so an entry never has two writers at once; and a worker reuses a slot only after
the training process has received (so mapped) the slot's current buffers. When no slot is
free (the consumer holds on to many batches) the worker collates into fresh shared memory
as torch does: reuse never waits, and correctness never depends on timing.
"""
from __future__ import annotations

import logging

import itertools
import os
from typing import Dict, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

MARK = "__buffers__"
"""Batch key of the ``(worker, source, slot, token, generation)`` mark of a batch in reused buffers."""
SLOTS = 4
"""Buffers per worker and source: the batches a worker may have queued (the DataLoader's prefetch
factor, 2), the one the training step holds, and a spare for the step that is letting go of its own."""

log = logging.getLogger(__name__)


class BatchBuffers:
    """The board and, inside each worker process, that worker's buffers.

    Args:
        workers: DataLoader workers.
        sources: sources of the stream (each has its own batch shapes, so its own buffers).
        slots: buffers per worker and source.
    """

    def __init__(self, workers: int, sources: int, slots: int = SLOTS):
        self.board = torch.zeros(workers, sources, slots, dtype=torch.int64).share_memory_()
        self._slots: Dict[tuple, "Slot"] = {}  # (source, slot) -> this worker's Slot
        self._counter = itertools.count(1)

    def __getstate__(self) -> dict:  # a spawned worker starts with no buffers of its own
        return {"board": self.board}

    def __setstate__(self, state: dict) -> None:
        self.board = state["board"]
        self._slots, self._counter = {}, itertools.count(1)

    def token(self) -> int:
        """A number no other process (pid in the high bits) and no earlier call of this one hands out."""
        return (os.getpid() << 32) | next(self._counter)

    def take(self, worker: int, source: int, size: int) -> Optional["Slot"]:
        """In worker ``worker``: a free slot of ``source`` for a batch of ``size`` samples, now marked taken;
        None when every slot is still held by the training process."""
        entries = self.board[worker, source]
        index = next((slot for slot, entry in enumerate(entries.tolist()) if entry == 0), None)
        if index is None:
            return None
        slot = self._slots.setdefault((source, index), Slot(self, worker, source, index))
        slot.token = self.token()
        entries[index] = slot.token  # taken before anything is written
        slot.size = size
        return slot


class Slot:
    """One worker's buffers for one batch of one source: the stream's batching stage copies each sample's
    tensors into its row (:meth:`put`), then :meth:`finish` makes the batch."""

    def __init__(self, owner: BatchBuffers, worker: int, source: int, index: int):
        self.owner, self.worker, self.source, self.index = owner, worker, source, index
        self.buffers: Dict[str, torch.Tensor] = {}
        self.generation = 0  # renewed whenever the buffers are (re)allocated
        self.sent = 0  # the generation the training process has received
        self.token = 0
        self.size = 0

    def put(self, row: int, sample: dict) -> dict:
        """Copy the tensor fields of ``sample`` into row ``row``; returns the sample without them.

        Raises:
            ValueError: a field's shape or dtype differs from the batch's (row 0 decides).
        """
        tensors = {name: value for name, value in sample.items() if torch.is_tensor(value)}
        if row == 0:
            self._fit(tensors)
        elif set(tensors) != set(self.buffers):
            raise ValueError(f"sample fields {sorted(tensors)} differ from the batch's {sorted(self.buffers)}")
        for name, value in tensors.items():
            buffer = self.buffers[name]
            if value.shape != buffer.shape[1:] or value.dtype != buffer.dtype:
                raise ValueError(f"{name!r} is {value.dtype} {tuple(value.shape)}, the batch's rows "
                                 f"{buffer.dtype} {tuple(buffer.shape[1:])}")
            buffer[row].copy_(value)
        return {name: value for name, value in sample.items() if name not in tensors}

    def _fit(self, tensors: Dict[str, torch.Tensor]) -> None:
        """(Re)allocate the buffers where the first sample's fields do not fit them."""
        if set(tensors) != set(self.buffers):
            self.buffers = {}
        for name, value in tensors.items():
            shape = (self.size, *value.shape)
            buffer = self.buffers.get(name)
            if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != value.dtype:
                self.buffers[name] = torch.empty(shape, dtype=value.dtype).share_memory_()
                self.generation = 0
        if not self.generation:
            self.generation = self.owner.token()

    def finish(self) -> dict:
        """The batch's tensors by field (left out when the training process already maps this
        generation of the buffers) plus :data:`MARK`."""
        if not self.buffers:  # no tensor field (a device-path batch without masks): nothing to hand back later
            self.owner.board[self.worker, self.source, self.index] = 0
            return {}
        batch = dict(self.buffers) if self.sent != self.generation else {}
        self.sent = self.generation
        batch[MARK] = (self.worker, self.source, self.index, self.token, self.generation)
        return batch


def _alias(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer``'s memory under a storage of its own, whose expiry says that the consumer let go."""
    if not buffer.numel():  # nothing to share (DINOv2 without local crops)
        return torch.empty(buffer.shape, dtype=buffer.dtype)
    raw = torch.frombuffer(buffer.view(torch.uint8).numpy(), dtype=torch.uint8)
    return raw.view(buffer.dtype).view(buffer.shape)


def pin(buffers: Dict[str, torch.Tensor]) -> bool:
    """Page-lock shared batch buffers in place (cudaHostRegister), once per slot generation: copies from
    them to the GPU then run as asynchronous DMA. False (said once) where the driver refuses."""
    cudart = torch.cuda.cudart()
    for name, buffer in buffers.items():
        if buffer.numel():
            code = int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0))
            if code:
                log.warning("cannot page-lock the batch buffer %r (cudaError %d): batches cross to the GPU from "
                            "pageable memory", name, code)
                return False
    return True


def unpin(buffers: Dict[str, torch.Tensor]) -> None:
    """Undo :func:`pin` for buffers about to be replaced by a new generation."""
    for buffer in buffers.values():
        if buffer.numel():
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class ReleasingLoader:
    """The training process's end of the stream.

    It iterates the DataLoader, makes each batch's ``seed`` list an int64 tensor (a list
    crosses from a worker inside the pickled batch; a tensor would need a shared-memory
    hand-over of its own), runs ``decode`` (the device path's step, which makes the views of encoded images
    on the GPU) where given, and, where workers write into :class:`BatchBuffers`, puts each batch's
    buffers in (from its mapping of the slot) and hands them back once nothing in this process
    uses them (checked before every fetch). ``reused`` and ``fresh`` count the batches that came
    in reused buffers and in fresh memory.
    """

    def __init__(self, loader, buffers: Optional[BatchBuffers], pin: bool = False, decode=None):
        self.loader = loader
        self.decode = decode  # the device path's last step (data_pipeline/device_decode.py): encoded images -> views
        self.buffers = buffers
        self.pin = pin  # page-lock each mapped generation of the buffers for asynchronous copies to the GPU
        self.mapped: Dict[tuple, tuple] = {}  # (worker, source, slot) -> (generation, buffers by field)
        self.held: list = []  # (weak references to a batch's aliases, its mark)
        self.reused = 0
        self.fresh = 0

    def release(self) -> None:
        """Give back the slots of batches whose buffers this process no longer uses."""
        still = []
        for refs, (worker, source, slot, token) in self.held:
            if all(ref.expired() for ref in refs):
                entries = self.buffers.board[worker, source]
                if int(entries[slot]) == token:
                    entries[slot] = 0
            else:
                still.append((refs, (worker, source, slot, token)))
        self.held = still

    def _fill(self, batch: dict, mark: tuple) -> None:
        """Put the buffers of a marked batch in (mapping them if they came with it) and hold its slot."""
        worker, source, slot, token, generation = mark
        sent = {name: value for name, value in batch.items() if torch.is_tensor(value)}
        if sent:
            if self.pin:
                unpin(self.mapped.get((worker, source, slot), (None, {}))[1])
                self.pin = pin(sent)
            self.mapped[worker, source, slot] = (generation, sent)
        mapped_generation, buffers = self.mapped.get((worker, source, slot), (None, {}))
        if mapped_generation != generation:
            raise RuntimeError(f"batch buffers of worker {worker}, source {source}, slot {slot}: generation "
                               f"{generation} was never received (this process maps {mapped_generation})")
        aliases = {name: _alias(buffer) for name, buffer in buffers.items()}
        batch.update(aliases)
        self.held.append(([StorageWeakRef(a.untyped_storage()) for a in aliases.values()], (worker, source, slot, token)))

    def __iter__(self) -> Iterator[dict]:
        """Starts the DataLoader's iterator (so its workers, which draw from the torch RNG) at once, as
        ``iter(DataLoader)`` does, and returns the batches."""
        return self._batches(iter(self.loader))

    def _batches(self, batches) -> Iterator[dict]:
        while True:
            if self.held:
                self.release()
            try:
                batch = next(batches)
            except StopIteration:
                return
            mark = batch.pop(MARK, None)
            if mark is not None:
                self._fill(batch, tuple(mark))
                self.reused += 1
            elif self.buffers is not None:
                self.fresh += 1
            batch["seed"] = torch.tensor(batch["seed"], dtype=torch.int64)
            if self.decode is not None:
                batch = self.decode(batch)
            yield batch
            del batch  # a batch the consumer has dropped must not be kept alive here
