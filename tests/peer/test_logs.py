"""Peer-aware logging: adapters carry peer id and round; the CLI formats text or JSON lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from lioncub.peer.logs import configure_logging, peer_logger, short_peer_id

PEER = "12D3KooWAbCdEfabc123"


@pytest.fixture
def root_state() -> Iterator[None]:
    """Undo whatever configure_logging does to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_short_peer_id() -> None:
    assert short_peer_id(PEER) == "abc123"
    assert short_peer_id("alice") == "alice"


def test_adapter_puts_peer_and_round_on_records(caplog: pytest.LogCaptureFixture) -> None:
    log = peer_logger("lioncub.peer.test_a", PEER)
    caplog.set_level(logging.INFO, logger="lioncub.peer.test_a")
    log.info("before the first round")
    log.set_round(7)
    log.info("in round %d", 7)
    first, second = caplog.records
    assert (first.peer, first.peer_id, first.round) == ("abc123", PEER, None)  # type: ignore[attr-defined]
    assert (second.peer, second.round, second.getMessage()) == ("abc123", 7, "in round 7")  # type: ignore[attr-defined]
    assert second.name == "lioncub.peer.test_a"


def test_loggers_of_one_peer_share_the_round_and_peers_are_separate(caplog: pytest.LogCaptureFixture) -> None:
    a1 = peer_logger("lioncub.peer.test_x", "peer-a")
    a2 = peer_logger("lioncub.peer.test_y", "peer-a")
    b = peer_logger("lioncub.peer.test_x", "peer-b")
    caplog.set_level(logging.INFO)
    a1.set_round(3)
    b.set_round(9)
    a2.info("a")
    b.info("b")
    assert [(r.peer, r.round) for r in caplog.records] == [("peer-a", 3), ("peer-b", 9)]  # type: ignore[attr-defined]
    assert a2.round == 3 and b.peer_id == "peer-b"


def test_set_round_is_validated() -> None:
    log = peer_logger("lioncub.peer.test_v", "p")
    with pytest.raises(ValueError, match="round must be an integer >= 0"):
        log.set_round(-1)
    log.set_round(None)


def test_text_lines(root_state: None) -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    log = peer_logger("lioncub.peer.test_t", PEER)
    log.set_round(7)
    log.info("hello %s", "world")
    log.debug("not shown at info")
    logging.getLogger("someone.else").warning("no peer here")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(stamp + r" INFO peer=abc123 round=7 lioncub\.peer\.test_t: hello world", lines[0])
    assert re.fullmatch(stamp + r" WARNING peer=- round=- someone\.else: no peer here", lines[1])


def test_json_lines_with_exception(root_state: None) -> None:
    stream = io.StringIO()
    configure_logging(logging.DEBUG, json=True, stream=stream)
    log = peer_logger("lioncub.peer.test_j", PEER)
    log.set_round(2)
    log.debug("line\nbreak")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["time"].endswith("Z") and first["level"] == "DEBUG"
    assert {k: first[k] for k in ("peer", "peer_id", "round", "module", "message")} == {
        "peer": "abc123",
        "peer_id": PEER,
        "round": 2,
        "module": "lioncub.peer.test_j",
        "message": "line\nbreak",
    }
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exception"]


def test_bound_peer_reaches_other_loggers_and_tasks(root_state: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    log = peer_logger("lioncub.peer.test_b", PEER)
    log.set_round(4)
    other = logging.getLogger("lioncub.peer.test_other")

    async def task() -> None:
        other.info("inside a task")

    with log.bind():
        other.info("bound")
        asyncio.run(task())
    other.info("unbound")
    lines = stream.getvalue().splitlines()
    assert ["peer=abc123 round=4" in line for line in lines] == [True, True, False]
    assert "peer=- round=-" in lines[2]


def test_reconfiguring_replaces_the_handler(root_state: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    h1 = configure_logging("INFO", stream=first)
    h2 = configure_logging("WARNING", stream=second)
    logging.getLogger("lioncub.peer.test_r").warning("once")
    assert h1 not in logging.getLogger().handlers and h2 in logging.getLogger().handlers
    assert first.getvalue() == "" and second.getvalue().count("once") == 1
    assert logging.getLogger().level == logging.WARNING


def test_bad_level() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


def test_library_modules_install_no_handlers() -> None:
    import lioncub.peer.checkpoint
    import lioncub.peer.logs
    import lioncub.peer.metrics  # noqa: F401

    for name in ("lioncub.peer.checkpoint", "lioncub.peer.metrics", "lioncub.peer.logs"):
        assert logging.getLogger(name).handlers == []
