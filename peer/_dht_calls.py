"""Bounded DHT calls usable from threads and from asyncio, plus checks for data read from the DHT.

Every request goes through :func:`submit_store` / :func:`submit_get`, which hand it to the hivemind
DHT process with ``return_future=True`` and return at once. The answer is read through a
:class:`Pending`: ``.wait()`` blocks the calling thread, ``await .wait_async()`` suspends only the
calling coroutine (``asyncio.wrap_future`` on hivemind's ``MPFuture``). Both are bounded by a timeout
and turn every failure (timeout, dead DHT process, hivemind error) into a :class:`DHTError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack
from hivemind.dht import DHT

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT = 15.0
"""Seconds a single store/get may take before it is reported as a :class:`DHTError`."""

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PEER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_DEPTH = 32
_MAX_INT = 2**64 - 1
_MIN_INT = -(2**63)

# hivemind's DHT sends requests to its process over one multiprocessing pipe, which is not safe to
# write from two threads at once; every send from this package holds this lock (it is held for the
# duration of one pipe write, never while waiting for an answer).
_SEND_LOCK = threading.Lock()

# Three distinct classes on Python 3.10, one class from 3.11 on.
TIMEOUT_ERRORS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)


class DHTError(RuntimeError):
    """A DHT node could not start, or a DHT request failed or timed out. The message says what to check."""


def check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a valid run id or key component (1-64 of ``A-Z a-z 0-9 _ -``)."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ValueError(f"{what} must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'; got {value!r:.80}")
    return value


def check_peer_id(value: object, what: str = "peer id") -> str:
    """Return ``value`` if it looks like a peer id (1-128 printable characters, no spaces)."""
    if not isinstance(value, str) or _PEER_ID_RE.fullmatch(value) is None:
        raise ValueError(
            f"{what} must be 1-128 characters from A-Z, a-z, 0-9, '.', '_' and '-'; got {value!r:.80}"
        )
    return value


def check_round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"round must be an int in [0, 2**63); got {value!r:.80}")
    return value


def check_plain(value: object, max_bytes: int, what: str) -> None:
    """Check that ``value`` is JSON-like plain data no larger than ``max_bytes`` once msgpack-encoded.

    Allowed: dict with str keys, list, str, int (64-bit), finite float, bool, None; nesting depth at
    most 32. Tuples, bytes and anything else are rejected (use lists). Raises ``ValueError``.
    """
    _check_plain_node(value, 0, what)
    size = len(msgpack.packb(value, use_bin_type=True))
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes encoded; the limit is {max_bytes} bytes")


def _check_plain_node(value: object, depth: int, where: str) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not _MIN_INT <= value <= _MAX_INT:
            raise ValueError(f"{where}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: float {value} is not finite")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_node(item, depth + 1, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: dict key {key!r:.40} is not a str")
            _check_plain_node(item, depth + 1, f"{where}.{key:.40}")
        return
    raise ValueError(f"{where}: {type(value).__name__} is not plain data (dict/list/str/int/float/bool/None)")


class _LogOnce:
    """Warn once per distinct reason about bad DHT entries (a hostile peer must not flood the log)."""

    def __init__(self, limit: int = 1024) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            first = reason not in self._seen
            if first:
                if len(self._seen) >= self._limit:
                    self._seen.clear()
                self._seen.add(reason)
        logger.log(logging.WARNING if first else logging.DEBUG, "ignoring DHT entry: %s", reason)


skip_entry = _LogOnce()
"""Log (once per distinct reason, then at DEBUG) that a malformed DHT entry was ignored."""


def subkey_entries(result: object, key: str, now: float) -> list[tuple[object, object]]:
    """Unpack the answer of a ``get`` on a subkey dictionary into live ``(subkey, value)`` pairs.

    Answers that are not a subkey dictionary (someone stored a plain value under ``key``) and
    entries that have expired are dropped; values are returned unchecked.
    """
    if result is None:
        return []
    outer = getattr(result, "value", None)
    if not isinstance(outer, dict):
        skip_entry(f"{key}: expected a subkey dictionary, found {type(outer).__name__}")
        return []
    entries: list[tuple[object, object]] = []
    for subkey, item in outer.items():
        value = getattr(item, "value", None)
        expiration = getattr(item, "expiration_time", None)
        if not isinstance(expiration, (int, float)) or isinstance(expiration, bool):
            skip_entry(f"{key}: subkey {subkey!r:.80} has no expiration time")
            continue
        if expiration > now:
            entries.append((subkey, value))
    return entries


def _ensure_alive(dht: DHT) -> None:
    try:
        alive = dht.is_alive()
    except AssertionError:  # multiprocessing only lets the parent ask; other processes just try
        alive = True
    if not alive:
        raise DHTError("the DHT process is not running (it was shut down or crashed); start a new one")


def submit_store(
    dht: DHT, key: str, value: Any, expiration_time: float, subkey: str | None = None
) -> Future[Any]:
    """Send a store request to the DHT process and return its future (resolves to a bool)."""
    _ensure_alive(dht)
    with _SEND_LOCK:
        future: Future[Any] = dht.store(
            key, value, expiration_time=expiration_time, subkey=subkey, return_future=True
        )
    return future


def submit_get(dht: DHT, key: str) -> Future[Any]:
    """Send a ``get(key, latest=True)`` to the DHT process and return its future."""
    _ensure_alive(dht)
    with _SEND_LOCK:
        future: Future[Any] = dht.get(key, latest=True, return_future=True)
    return future


def submit_coroutine(dht: DHT, coro: Callable[[DHT, Any], Any]) -> Future[Any]:
    """Run a module-level ``async def coro(dht, node)`` inside the DHT process (see ``DHT.run_coroutine``)."""
    _ensure_alive(dht)
    with _SEND_LOCK:
        future: Future[Any] = dht.run_coroutine(coro, return_future=True)
    return future


@dataclass(frozen=True)
class Pending(Generic[T]):
    """DHT requests in flight and how to turn their answers into a result."""

    futures: Sequence[Future[Any]]
    parse: Callable[[list[Any]], T]
    timeout: float
    what: str

    def wait(self) -> T:
        """Block the calling thread until all answers are in (at most ``timeout`` seconds)."""
        deadline = time.monotonic() + self.timeout
        try:
            answers = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in self.futures]
        except TIMEOUT_ERRORS:
            self._cancel()
            raise self._timeout_error() from None
        except Exception as e:
            self._cancel()
            raise DHTError(f"{self.what} failed: {e!r}") from e
        return self.parse(answers)

    async def wait_async(self) -> T:
        """Like :meth:`wait`, but suspends only the calling coroutine."""
        gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in self.futures))
        # If we stop waiting (timeout, cancellation) and the DHT later cancels or fails the calls,
        # the gathering future still ends with an exception: retrieve it so asyncio does not log
        # "exception was never retrieved" at shutdown.
        gathered.add_done_callback(_retrieve)
        try:
            answers = await asyncio.wait_for(gathered, timeout=self.timeout)
        except TIMEOUT_ERRORS:
            self._cancel()
            raise self._timeout_error() from None
        except asyncio.CancelledError:
            self._cancel()
            raise
        except Exception as e:
            self._cancel()
            raise DHTError(f"{self.what} failed: {e!r}") from e
        return self.parse(list(answers))

    def _cancel(self) -> None:
        for f in self.futures:
            f.cancel()

    def _timeout_error(self) -> DHTError:
        return DHTError(
            f"{self.what} got no answer within {self.timeout:.1f} s; "
            "check that the DHT process is alive and that other peers are reachable"
        )


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
