"""Tracking off the training thread: a bounded queue that one background thread empties into the tracker.

Rank 0's tracking calls (HTTP to an MLflow server, artifact uploads) must never make the training
thread wait, or every other rank waits for it in the next collective and a slow or absent server
trips the NCCL watchdog. :class:`QueuedTracker` wraps a tracker: each call is queued and returns at
once; the thread makes the calls in order and retries a call that fails (a server that is down or
restarting) until it goes through, so nothing is lost. The queue holds ``maxsize`` calls; when it
is full (a server down for a long time), a call waits for room rather than dropping a metric, and
says so once. The thread takes everything queued at once, sends consecutive metric calls as one
batch, then rests ``interval_s`` (1 s): one store round trip per second rather than one per step,
which on a small CPU machine costs the training processes' cores. :meth:`flush` waits for the queue
to empty, up to a timeout (before a checkpoint: the steps it covers are in the store when it is
complete); :meth:`finish` flushes, then closes the run.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

_STOP = object()
TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED")
"""MLflow error codes of a server that is down, restarting or overloaded: the call is tried again."""


def retryable(error: Exception) -> bool:
    """True for failures that a later try can get past (no connection, a 5xx); False for a refused request
    (a bad value), which no retry changes."""
    return isinstance(error, OSError) or getattr(error, "error_code", None) in TRANSIENT


def coalesced(items):
    """The calls of ``items`` in order, each run of consecutive log_metrics calls as one
    ``log_metrics_many([(metrics, step), ...])``."""
    run: list = []
    for method, args in items:
        if method == "log_metrics":
            run.append(args)
            continue
        if run:
            yield "log_metrics_many", (run,)
            run = []
        yield method, args
    if run:
        yield "log_metrics_many", (run,)


class QueuedTracker:
    """The tracker interface of :class:`pretrain.tracking.NullTracker`, asynchronous over ``inner``."""

    def __init__(self, inner, maxsize: int = 10000, retry_s: float = 2.0, interval_s: float = 1.0):
        self.inner = inner
        self.run_id = inner.run_id
        self.retry_s = retry_s
        self.interval_s = interval_s
        self.flushing = threading.Event()  # set while a flush waits: no rest between rounds
        self.calls: queue.Queue = queue.Queue(maxsize=maxsize)
        self.failures = 0
        self.dropped = 0
        """Calls the tracker refused (bad requests), logged as errors."""
        self._said_full = False
        self._finished = False
        self.thread = threading.Thread(target=self._drain, name="tracking", daemon=True)
        self.thread.start()

    def _put(self, method: str, *args) -> None:
        try:
            self.calls.put_nowait((method, args))
        except queue.Full:
            if not self._said_full:
                self._said_full = True
                log.warning("tracking queue full (%d calls; is the tracking server down?): training waits for "
                            "room rather than drop metrics", self.calls.maxsize)
            self.calls.put((method, args))

    def _drain(self) -> None:
        """Take what is queued, make the calls (consecutive metric calls as one), then rest ``interval_s``
        (unless a flush waits): one tracker round trip per interval, not one per step."""
        while True:
            items = [self.calls.get()]
            while len(items) < self.calls.maxsize:
                try:
                    items.append(self.calls.get_nowait())
                except queue.Empty:
                    break
            try:
                calls = [item for item in items if item is not _STOP]
                for method, args in (coalesced(calls) if hasattr(self.inner, "log_metrics_many") else calls):
                    self._call(method, args)
            finally:
                for _ in items:
                    self.calls.task_done()
            if any(item is _STOP for item in items):
                return
            self.flushing.wait(self.interval_s)

    def _call(self, method: str, args: tuple) -> None:
        """Make one call, retrying until it goes through (the first failure of an outage is logged)."""
        while True:
            try:
                getattr(self.inner, method)(*args)
                if self.failures:
                    log.info("tracking: %s went through after %d failed tries", method, self.failures)
                    self.failures = 0
                return
            except Exception as error:  # noqa: BLE001 - a tracker's failure never reaches the training thread
                if not retryable(error):
                    self.dropped += 1
                    log.error("tracking: %s refused, not retried: %s", method, str(error).splitlines()[0][:300])
                    return
                self.failures += 1
                if self.failures == 1:
                    log.warning("tracking: %s failed (%s); retrying every %.0f s, training goes on", method,
                                str(error).splitlines()[0][:200], self.retry_s)
                time.sleep(self.retry_s)

    def log_params(self, params) -> None:
        self._put("log_params", dict(params))

    def set_tags(self, tags) -> None:
        self._put("set_tags", dict(tags))

    def log_metrics(self, metrics, step: int) -> None:
        self._put("log_metrics", {k: float(v) for k, v in metrics.items()}, step)

    def log_image(self, name: str, image, step: int) -> None:
        self._put("log_image", name, image.copy(), step)

    def log_artifact(self, path: str, folder: Optional[str] = None) -> None:
        self._put("log_artifact", path, folder)

    def pending(self) -> int:
        """Calls not yet made."""
        return self.calls.unfinished_tasks

    def flush(self, timeout: float = 120.0) -> bool:
        """Wait until every queued call is made, up to ``timeout`` seconds; True when the queue is empty."""
        deadline = time.monotonic() + timeout
        self.flushing.set()
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.flushing.clear()
        if self.pending():
            log.warning("tracking: %d calls still queued after %.0f s (they are kept and retried)", self.pending(),
                        timeout)
        return not self.pending()

    def finish(self, status: str = "FINISHED", timeout: float = 600.0) -> None:
        """Make every queued call (up to ``timeout`` seconds), then close the run on the calling thread."""
        if self._finished:
            return
        self._finished = True
        self.flush(timeout)
        self.flushing.set()
        self.calls.put(_STOP)
        self.thread.join(timeout=5)
        self.inner.finish(status)
