"""Writing a checkpoint's files: in place (the run waits), or from a host copy by a background thread.

Every file of a checkpoint goes through the rank's :class:`CheckpointWriter`: DeepSpeed's through the
checkpoint engine :func:`pretrain.engine.route_checkpoint_files` gives the engine, the run state's and
the objective's through :func:`pretrain.checkpoint.save`. Each file's size and CRC-32 are taken as soon
as it is written (while it is still in the page cache). When a rank has written all of its files of a
checkpoint it leaves its report (``COMPLETE.rank{R}``, :func:`pretrain.integrity.write_report`); rank
0's commit (a callable of pretrain.checkpoint) waits for every rank's report and writes the ``COMPLETE``
marker last.

In the background, :meth:`CheckpointWriter.put` copies the state into host memory before it returns
(into buffers kept from one checkpoint to the next, pinned when the tensors live on a GPU, so the
copies run at the link's speed and are allocated once), and one thread per checkpoint writes the
copies, the report and (rank 0) the marker. The run waits for it only where it must: before the next
checkpoint (one at a time, so the buffers are free again), at a stop and at the end. A failure to write
is raised there, as a failure in place would have been raised at the save.

``checkpoint.writer``: ``inline`` (in place), ``background``, or ``auto``: in place until a save holds the run
for more than :data:`AUTO_SHARE` of the wall time since the one before on any rank, then in the
background where every rank's host has room for the copy and a core the step does not use (a GPU run,
or a CPU run with fewer torch threads than cores) (:meth:`CheckpointWriter.adapt`: all ranks take the
same way).
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import psutil
import torch

from pretrain import integrity

log = logging.getLogger(__name__)

AUTO_SHARE = 0.05
"""``auto`` writes in the background once a save held the run for more than this share of the wall time
since the previous one (the faults issue's threshold)."""
HOST_ROOM = 0.5
"""``auto`` keeps writing in place when the host copy would take more than this share of the memory
available (the loader's workers and the page cache need the rest)."""


def spare_core() -> bool:
    """Whether this node's training processes leave a core free for a writer thread: their torch threads
    (this process's count times the processes on the node) are fewer than the cores this process may use.
    On a CPU-only run with every core computing, a background write slowed the steps after it by more than
    it saved (benchmarks/checkpoint_save.py)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.get_num_threads() * local < len(os.sched_getaffinity(0))


class HostCopier:
    """Copies of nested state (dicts, lists and tuples of tensors and plain values) that the training step
    may overwrite after: tensors into host buffers kept between checkpoints, per file and position (pinned
    when the tensor is on a GPU), shared tensors copied once; other values deep-copied."""

    def __init__(self):
        self.buffers: Dict[tuple, torch.Tensor] = {}
        self.nbytes = 0

    def copy(self, name: str, state):
        """A host copy of ``state``, the state of file ``name``; complete when it returns."""
        self._slot, self._memo, self._device = 0, {}, False
        out = self._copy(name, state)
        if self._device:
            torch.cuda.synchronize()  # the non-blocking copies into pinned buffers have landed
        self.nbytes = sum(buffer.nbytes for buffer in self.buffers.values())
        return out

    def _copy(self, name: str, value):
        if torch.is_tensor(value):
            return self._tensor(name, value)
        if isinstance(value, dict):
            items = [(key, self._copy(name, item)) for key, item in value.items()]
            try:
                return type(value)(items)
            except TypeError:  # a dict subclass whose constructor takes other arguments
                return dict(items)
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
            return type(value)(self._copy(name, item) for item in value)
        return copy.deepcopy(value)

    def _tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) in self._memo:  # the same tensor twice (tied weights): one copy, as torch.save keeps it
            return self._memo[id(tensor)]
        key = (name, self._slot)
        self._slot += 1
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self.buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        self._device |= tensor.is_cuda
        self._memo[id(tensor)] = buffer
        return buffer


class CheckpointWriteError(RuntimeError):
    """A checkpoint's files could not be written (on this rank or, for rank 0's commit, on another)."""


class CheckpointWriter:
    """One rank's writer of checkpoint files: :meth:`begin`, :meth:`put` each file, :meth:`finish`."""

    def __init__(self, mode: str, rank: int, gpu: bool = False):
        self.mode = mode
        self.gpu = gpu  # the step runs on a GPU: its host cores are free for the writer
        self.background = mode == "background"
        self.rank = rank
        self.copier = HostCopier()
        self.thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None
        self.written: List[Tuple[int, float]] = []  # (step, seconds) of each background write when it is done
        self.folder, self.step, self.files, self.digests = "", 0, [], {}

    def begin(self, folder: str, step: int) -> None:
        """Start checkpoint ``folder`` of ``step`` (after :meth:`wait`: one checkpoint at a time)."""
        self.folder, self.step, self.files, self.digests = folder, step, [], {}

    def put(self, path: str, state) -> None:
        """File ``path`` of the checkpoint holds ``state`` (torch.save): written now, or copied now and
        written by :meth:`finish`'s thread."""
        if self.background:
            self.files.append((path, self._guarded(self.copier.copy, os.path.basename(path), state)))
        else:
            self._guarded(self._write, path, state)

    def finish(self, commit: Optional[Callable[[], None]] = None) -> None:
        """Every file of the checkpoint was put: write what is left, this rank's report, then run
        ``commit`` (rank 0: the marker, once every rank reported); in a thread in the background."""
        if not self.background:
            self._complete(commit)
            return
        self.thread = threading.Thread(target=self._run, args=(commit,), name="checkpoint-writer", daemon=True)
        self.thread.start()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Until the checkpoint in the background is written (and committed, on rank 0).

        Raises:
            CheckpointWriteError: writing it failed (the checkpoint stays incomplete, so no one resumes it).
        """
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.error("checkpoint %s is still being written after %.0f s; left incomplete", self.folder, timeout)
                return
            self.thread = None
        failure, self.failure = self.failure, None
        if failure is not None:
            raise CheckpointWriteError(f"writing checkpoint {self.folder} failed: {failure}") from failure

    def adapt(self, held_s: float, interval_s: float, agree: Callable[[float], float]) -> None:
        """``auto``: write in the background from now on when the last save held the run for more than
        :data:`AUTO_SHARE` of ``interval_s`` on any rank, and on every rank a host copy of its files fits in
        memory and the step leaves the writer a core (:func:`spare_core`). Collective: ``agree`` (the maximum
        over the ranks) makes every rank take the same way, since an inline save ends in a barrier that a
        background one does not make."""
        if self.mode != "auto" or self.background:
            return
        share = agree(held_s / interval_s if interval_s > 0 else 0.0)
        size = sum(digest["size"] for digest in self.digests.values())
        available = psutil.virtual_memory().available
        crowded = agree(float(size > HOST_ROOM * available))
        busy = agree(float(not (self.gpu or spare_core())))
        if share <= AUTO_SHARE:
            return
        self.mode = "inline"  # unless the checks below pass: decided once
        if crowded or busy:
            reason = (f"a host copy ({size / 1e9:.2f} GB here) does not fit beside the memory available on every "
                      f"rank ({available / 1e9:.2f} GB here)" if crowded else
                      "the step uses every core (a background write would slow it by more than it saves)")
            if self.rank == 0:
                log.info("checkpoint saves held the run for %.0f%% of the time, but %s: still writing inline",
                         100 * share, reason)
            return
        self.mode, self.background = "background", True
        if self.rank == 0:
            log.info("checkpoint saves held the run for %.0f%% of the time: writing the next ones from a host "
                     "copy (%.2f GB on rank 0) in the background", 100 * share, size / 1e9)

    def _write(self, path: str, state) -> None:
        torch.save(state, path)
        self.digests[os.path.relpath(path, self.folder)] = integrity.digest(path)

    def _guarded(self, work: Callable, *args):
        """``work(*args)``; if it fails, this rank's report says so (rank 0's commit stops waiting for it)."""
        try:
            return work(*args)
        except BaseException as exc:
            try:
                integrity.write_report(self.folder, self.rank, {}, error=f"rank {self.rank}: {exc!r}")
            except OSError:
                log.exception("could not report the failure in %s", self.folder)
            raise

    def _complete(self, commit: Optional[Callable[[], None]]) -> None:
        files, self.files = self.files, []
        for path, state in files:
            self._guarded(self._write, path, state)
        integrity.write_report(self.folder, self.rank, self.digests)
        if commit is not None:
            commit()

    def _run(self, commit: Optional[Callable[[], None]]) -> None:
        start = time.perf_counter()
        try:
            self._complete(commit)
            self.written.append((self.step, time.perf_counter() - start))
        except BaseException as exc:  # raised to the run at its next wait
            log.exception("writing checkpoint %s failed", self.folder)
            self.failure = exc
