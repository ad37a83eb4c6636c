"""Logging with the peer id and round on every line.

Library modules log through ``logging.getLogger(__name__)`` or, where they act for a peer,
``peer_logger(__name__, peer_id)``; loggers of one peer share its round. Only the CLI entry point
calls :func:`configure_logging`. Lines from loggers that know no peer (other modules, hivemind) get
the peer bound with :meth:`PeerLoggerAdapter.bind` in the current thread or asyncio task, else ``-``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json as _json
import logging
import sys
import threading
import weakref
from collections.abc import Iterator, MutableMapping
from typing import Any, TextIO

__all__ = [
    "PeerLogContext",
    "PeerLoggerAdapter",
    "configure_logging",
    "peer_logger",
    "short_peer_id",
]


def short_peer_id(peer_id: str) -> str:
    """A short form for log lines: ids longer than 8 characters keep their last 6 (libp2p ids share a prefix)."""
    return peer_id if len(peer_id) <= 8 else peer_id[-6:]


# hivemind renames WARNING to "WARN" globally when imported; our lines keep the standard names.
_LEVEL_NAMES = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


def _level(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno, record.levelname)


class PeerLogContext:
    """The identity and current round of one peer, shared by all its loggers."""

    def __init__(self, peer_id: str) -> None:
        if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 256:
            raise ValueError(f"peer_id must be a string of 1-256 characters, got {peer_id!r:.80}")
        self.peer_id = peer_id
        self.short = short_peer_id(peer_id)
        self.round: int | None = None


_contexts: weakref.WeakValueDictionary[str, PeerLogContext] = weakref.WeakValueDictionary()
_contexts_lock = threading.Lock()
_bound: contextvars.ContextVar[PeerLogContext | None] = contextvars.ContextVar(
    "lioncub_peer_log", default=None
)


class PeerLoggerAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds ``peer`` (short id), ``peer_id`` and ``round`` attributes to every record it logs."""

    def __init__(self, logger: logging.Logger, context: PeerLogContext) -> None:
        super().__init__(logger, {})
        self.context = context

    @property
    def peer_id(self) -> str:
        return self.context.peer_id

    @property
    def round(self) -> int | None:
        return self.context.round

    def set_round(self, round_: int | None) -> None:
        """Set the round shown on this peer's lines (all its loggers); None shows ``-``."""
        if round_ is not None and (isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0):
            raise ValueError(f"round must be an integer >= 0 or None, got {round_!r}")
        self.context.round = round_

    @contextlib.contextmanager
    def bind(self) -> Iterator[None]:
        """Within the block, lines of loggers that know no peer are attributed to this one.

        Bound per thread / asyncio task (a ``contextvars`` variable): tasks created inside inherit it.
        """
        token = _bound.set(self.context)
        try:
            yield
        finally:
            _bound.reset(token)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        ctx = self.context
        fields = {"peer": ctx.short, "peer_id": ctx.peer_id, "round": ctx.round}
        kwargs["extra"] = {**fields, **(kwargs.get("extra") or {})}
        return msg, kwargs


def peer_logger(name: str, peer_id: str) -> PeerLoggerAdapter:
    """The logger ``name`` speaking for ``peer_id``; adapters of one peer share its round."""
    with _contexts_lock:
        context = _contexts.get(peer_id)
        if context is None:
            context = PeerLogContext(peer_id)
            _contexts[peer_id] = context
    return PeerLoggerAdapter(logging.getLogger(name), context)


def _fields(record: logging.LogRecord) -> tuple[str | None, str | None, int | None]:
    """(short peer, full peer id, round) of a record, from its adapter or the bound peer."""
    if hasattr(record, "peer"):
        return record.peer, getattr(record, "peer_id", None), getattr(record, "round", None)
    ctx = _bound.get()
    return (ctx.short, ctx.peer_id, ctx.round) if ctx is not None else (None, None, None)


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = formatter.formatException(record.exc_info)
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


class _TextFormatter(logging.Formatter):
    """``time level peer=abc123 round=7 module: message``."""

    default_msec_format = "%s.%03d"

    def format(self, record: logging.LogRecord) -> str:
        peer, _, round_ = _fields(record)
        line = (
            f"{self.formatTime(record)} {_level(record)} peer={peer or '-'} "
            f"round={'-' if round_ is None else round_} {record.name}: {record.getMessage()}"
        )
        extra = _exception_text(self, record)
        return f"{line}\n{extra}" if extra else line


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, peer, peer_id, round, module, message."""

    def format(self, record: logging.LogRecord) -> str:
        peer, peer_id, round_ = _fields(record)
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": _level(record),
            "peer": peer,
            "peer_id": peer_id,
            "round": round_,
            "module": record.name,
            "message": record.getMessage(),
        }
        extra = _exception_text(self, record)
        if extra:
            doc["exception"] = extra
        return _json.dumps(doc, default=str)


class _CliHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


def _parse_level(level: int | str) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        value = logging.getLevelNamesMapping().get(level.strip().upper())
        if value is not None:
            return value
    raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")


def configure_logging(
    level: int | str = logging.INFO, *, json: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Send all logging to ``stream`` (default stderr) as text or JSON lines. For the CLI only.

    Calling it again replaces the handler it installed before; other handlers are left alone.
    Returns the installed handler.
    """
    parsed = _parse_level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _CliHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JsonFormatter() if json else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(parsed)
    return handler
