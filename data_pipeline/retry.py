"""Retrying remote shard reads: which errors are transient, and how long to wait before the next try.

An object store under load answers 503 SlowDown, a web server restarts, a connection resets in the
middle of a shard. None of these says anything about the data, and none should cost a long run its
samples: the tar stage (:func:`data_pipeline.stream.tar_samples`) reopens the shard after a
:meth:`RetryPolicy.delay` and continues at the first sample it has not yet passed on. Only an error
that :func:`transient` calls transient is retried, and only on a remote shard; a missing shard,
refused credentials, a truncated or corrupt archive end that shard at once, as before.

fsspec wraps what its backends raise (HTTP: a ``FileNotFoundError`` raised from aiohttp's
connection error; S3: an ``OSError`` from botocore's ``ClientError``), so the whole chain of causes
is looked at.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIED_STATUS = frozenset({408, 429})
"""HTTP statuses below 500 that mean "try again later" (timeout, too many requests); every 5xx is retried too."""
RETRIED_S3_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                              "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"})
"""S3 error codes that ask the client to retry."""
LOCAL_PROTOCOLS = ("file", "local")


@dataclass
class RetryPolicy:
    """Capped exponential backoff with jitter (``data.retry``): try ``k`` (from 0) waits a uniform draw
    from [0.5, 1] x min(``max_s``, ``initial_s`` x 2^k); ``attempts`` tries per failure (the count starts
    again once a sample got through)."""

    attempts: int = 10
    initial_s: float = 1.0
    max_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> Optional[float]:
        """Seconds to wait before retry ``attempt`` (0-based), or None once the retries are spent."""
        if attempt >= self.attempts:
            return None
        return min(self.max_s, self.initial_s * 2.0 ** attempt) * rng.uniform(0.5, 1.0)


def is_remote(url: str) -> bool:
    """Whether ``url`` names a shard behind a network protocol (http(s), s3, gs, ...): only those are retried."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return protocol not in LOCAL_PROTOCOLS


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused, reset, aborted; socket and asyncio timeouts
        return True
    status = getattr(exc, "status", None) or getattr(exc, "code", None)  # aiohttp's ClientResponseError, gcsfs
    if isinstance(status, int) and (status >= 500 or status in RETRIED_STATUS):
        return True
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        error, meta = response.get("Error", {}), response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode", 0)
        return error.get("Code") in RETRIED_S3_CODES or status >= 500 or status in RETRIED_STATUS
    module = type(exc).__module__
    if module.startswith("aiohttp"):  # a connection that closed, a payload that was cut, a server that went away
        return type(exc).__name__ in {"ClientConnectionError", "ClientConnectorError", "ClientOSError",
                                      "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError"}
    if module.startswith("botocore"):  # endpoint unreachable, connection closed, read or connect timeout
        return type(exc).__name__ in {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                                      "ConnectTimeoutError", "ResponseStreamingError"}
    return False


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its chain of causes) is an error that may pass if the read is retried."""
    return any(_transient_one(cause) for cause in causes(exc))


def retried(call: Callable[[], T], url: str, policy: Optional[RetryPolicy] = None) -> T:
    """``call()`` (one request about ``url``), retried under ``policy`` (default: :class:`RetryPolicy`'s) while
    it fails with a transient error on a remote URL: what start-up asks of a store (a manifest, a shard's size)."""
    policy, jitter, attempt = policy or RetryPolicy(), random.Random(), 0
    while True:
        try:
            return call()
        except Exception as exc:
            delay = policy.delay(attempt, jitter) if is_remote(url) and transient(exc) else None
            if delay is None:
                raise
            attempt += 1
            log.warning("retry %d for %s in %.1f s: %s", attempt, url, delay, exc)
            time.sleep(delay)
